#!/usr/bin/env bash
# Device call: the fused cross-entropy's real-size tests after the fp32 dW accumulation change, then four
# 0.25-GPU sweep trials at once vs one by one. Session 2 ran it with 60 s / 150 s limits and ~3 minutes of
# device time: pytest had not finished the 8 real-size cases at 60 s (no result), and the sweep finished
# its concurrent mode only (bench/results/tune_h200_20261128.json). The limits below are what it needs.
set -o pipefail
source bench/gpu/_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== flce real-size tests $(date +%T)"
timeout 300 python3 -m pytest -q -m gpu tests/kernels/test_cross_entropy.py -k real_sizes -p no:cacheprovider 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -12 | tee "$OUT/gpu_tests_flce.log"
echo "== fractional sweep $(date +%T)"
timeout 400 python3 bench/tune/bench_fractional.py --steps 60 --out "$OUT" 2>&1 | grep -vE "^\(|INFO|WARNING|Warning|warn" | tail -8
echo "== done $(date +%T)"
