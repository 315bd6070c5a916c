#!/usr/bin/env bash
# Device call, session 2 (about 3 minutes of device time were left): the fused cross-entropy's real-size
# bf16 tests after the fp32 dW accumulation change, then four 0.25-GPU sweep trials at once vs one by one.
set -o pipefail
source bench/gpu/_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== flce real-size tests $(date +%T)"
timeout 60 python3 -m pytest -q -m gpu tests/kernels/test_cross_entropy.py -k real_sizes -p no:cacheprovider 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -12 | tee "$OUT/gpu_tests_flce.log"
echo "== fractional sweep $(date +%T)"
timeout 150 python3 bench/tune/bench_fractional.py --steps 60 --out "$OUT" 2>&1 | grep -vE "^\(|INFO|WARNING|Warning|warn" | tail -8
echo "== done $(date +%T)"
