#!/usr/bin/env bash
# Device call 7 of session 5 (~120 s), issue 3: the NF4 kernel under its final defaults (2048 x 2 warps, nibble
# shift): the GPU-marked bit-exactness tests at 8B/70B weight shapes, then its kernel bench beside bitsandbytes.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_nf4.py --timeout=80 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -6 | tee "$OUT/gpu_tests_s5g.log"
echo "== nf4 bench $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 40 python3 bench/kernels/run_all.py --only nf4 --reps 30 \
  --out /tmp/kernels_s5g.json 2>&1 | grep -E "speedup_vs_torch\"|bandwidth_fraction\"|ours|bitsandbytes" | tail -8
cp /tmp/kernels_s5g.json "$OUT/kernels_s5g.json" 2>/dev/null
echo "== done $(date +%T)"
