#!/usr/bin/env bash
# Prepared in session 11, not run: what session 11's 2-GPU calls left unfinished (nvidia-h200-x2). The 2-GPU tests
# (ZeRO-3's bf16 NF4 partitioning ~70 s; DDP and ZeRO-3 through the CLI, tests/test_multigpu_train.py, never reported:
# call 3's 170 s limit cut them), then the whole-GPU sweep in both modes (call 3 finished only the concurrent one).
# ~500 s; carry .whl/core.
set -o pipefail
source bench/gpu/_env.sh
echo "== 2-GPU tests $(date +%T)"
timeout 330 python3 -m pytest -q -m multigpu tests/sharding/test_zero3_qlora.py tests/test_multigpu_train.py -p no:cacheprovider 2>&1 \
  | grep -E "passed|failed|FAILED|Error|skipped" | tail -8 | tee "$OUT/gpu_tests_multigpu_s12b.log"
echo "== sweep, 1 GPU per trial $(date +%T)"
timeout 240 python3 bench/tune/bench_fractional.py --trials 2 --fraction 1 --steps 30 --tag s12_gpu_per_trial --out "$OUT" 2>&1 \
  | grep -vE "^\(|INFO|WARNING|Warning|warn" | tail -6
echo "== done $(date +%T)"
