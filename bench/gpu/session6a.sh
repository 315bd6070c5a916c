#!/usr/bin/env bash
# Device call 1 of session 6 (~300 s), issue 3: the NF4 sweep with the 32-bit pair-store path, the trained-head fused
# CE sweep (chunk x dL/dW accumulator dtype, beside Liger, with errors against fp32), and the NF4 / CE tests on the GPU.
set -o pipefail
source bench/gpu/_env.sh
echo "== nf4 sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 150 python3 bench/kernels/sweep_nf4.py --settings \
  2048:2:0,2048:2:1,2048:4:1,4096:4:1,4096:8:1,1024:2:1,8192:8:1 --out "$OUT/nf4_sweep.json" 2>&1 \
  | grep -vE "Warning|warn|Configuration class" | tail -30
echo "== flce sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 200 python3 bench/kernels/sweep_flce.py \
  --settings fp32:4096,bf16:1024,bf16:2048,bf16:4096 --out "$OUT/flce_sweep.json" 2>&1 \
  | grep -vE "Warning|warn|Configuration class" | tail -12
echo "== gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_nf4.py tests/kernels/test_cross_entropy.py \
  --timeout=120 -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -12 | tee "$OUT/gpu_tests_s6a.log"
echo "== done $(date +%T)"
