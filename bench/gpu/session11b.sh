#!/usr/bin/env bash
# Session 11 (nvidia-h200-x2): the 2-GPU tests (ZeRO-3's bf16 NF4 partitioning; DDP and ZeRO-3 through the CLI), then a
# sweep of 2 trials that each own a whole GPU, at once and one after the other (issue 13, item 3). Carry .whl/core.
set -o pipefail
source bench/gpu/_env.sh
echo "== zero3 2-GPU test $(date +%T)"
timeout 200 python3 -m pytest -q -m multigpu tests/sharding/test_zero3_qlora.py tests/test_multigpu_train.py -p no:cacheprovider 2>&1 \
  | grep -E "passed|failed|FAILED|Error|skipped" | tail -8 | tee "$OUT/gpu_tests_multigpu_s11.log"
echo "== sweep, 1 GPU per trial $(date +%T)"
timeout 300 python3 bench/tune/bench_fractional.py --trials 2 --fraction 1 --steps 40 --tag s11_gpu_per_trial --out "$OUT" 2>&1 \
  | grep -vE "^\(|INFO|WARNING|Warning|warn" | tail -6
echo "== done $(date +%T)"
