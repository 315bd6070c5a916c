#!/usr/bin/env bash
# Device call 4 of session 4 (~350 s): the RoPE warps sweep beside Liger, the kernel bench of RMSNorm with its new
# backward launch settings, then the GPU-marked kernel and model tests and the dequantize_once test on CUDA.
set -o pipefail
source bench/gpu/_env.sh
t0=$(date +%s); left() { echo $(( ${1} - $(date +%s) + t0 )); }
echo "== rope sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 90 python3 bench/kernels/sweep_rope.py --out "$OUT/rope_sweep.json" \
  2>&1 | grep -vE "Warning|warn|Configuration class" | tail -14
echo "== kernel bench rms_norm $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 120 python3 bench/kernels/run_all.py --only rms_norm --reps 30 \
  --out /tmp/kernels_s4.json 2>&1 | grep -vE "Warning|warn|Configuration class" | tail -20
cp /tmp/kernels_s4.json "$OUT/kernels_s4.json" 2>/dev/null
echo "== gpu tests $(date +%T)"
timeout $(( $(left 420) > 60 ? $(left 420) : 60 )) python3 -m pytest -q -m gpu tests/kernels tests/models -p no:cacheprovider \
  --timeout=200 2>&1 | grep -E "passed|failed|FAILED|Error|PASSED" | tail -30 | tee "$OUT/gpu_tests_s4.log"
timeout 60 python3 -m pytest -q -p no:cacheprovider "tests/kernels/test_lora.py::test_dequantize_once_reuses_the_recompute_weights" \
  tests/kernels/test_rms_norm.py 2>&1 | tail -3 | tee -a "$OUT/gpu_tests_s4.log"
echo "== done $(date +%T)"
