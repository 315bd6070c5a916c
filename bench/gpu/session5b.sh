#!/usr/bin/env bash
# Device call 2 of session 5 (~400 s), issue 3: the GPU-marked kernel and model tests (call 1's 150 s ran out in the
# model tests); the RoPE sweep over warps and tokens per program; the kernel bench of swiglu (new launch settings,
# gradients handed back as fresh views) and rope.
set -o pipefail
source bench/gpu/_env.sh
echo "== rope sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 100 python3 bench/kernels/sweep_rope.py --warps 4,8 --tokens 1,2,4 \
  --out "$OUT/rope_sweep.json" 2>&1 | grep -vE "Warning|warn|Configuration class" | tail -20
echo "== kernel bench $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 100 python3 bench/kernels/run_all.py --only rope swiglu --reps 30 \
  --out /tmp/kernels_s5b.json 2>&1 | grep -E "speedup_vs_liger\"|bandwidth_fraction\"|peak_extra_mib" | tail -12
cp /tmp/kernels_s5b.json "$OUT/kernels_s5b.json" 2>/dev/null
echo "== gpu tests $(date +%T)"
timeout 300 python3 -m pytest -q -m gpu tests/kernels tests/models -p no:cacheprovider --timeout=200 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -20 | tee "$OUT/gpu_tests_s5b.log"
echo "== done $(date +%T)"
