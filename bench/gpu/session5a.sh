#!/usr/bin/env bash
# Device call 1 of session 5 (~420 s), issue 3 then issue 5: the GPU-marked kernel and model tests after the in-place
# SwiGLU backward, RoPE's halves_equal and the trained-head FLCE chunking; the SwiGLU launch-settings sweep beside
# Liger; the kernel bench of rope, swiglu and the fused linear CE; one 8B-shaped 4x2048 step timing (RoPE without
# the q/k copy in the patched attention).
set -o pipefail
source bench/gpu/_env.sh
t0=$(date +%s); left() { echo $(( ${1} - $(date +%s) + t0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_swiglu.py tests/kernels/test_rope.py \
  tests/kernels/test_cross_entropy.py tests/models -p no:cacheprovider --timeout=120 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -20 | tee "$OUT/gpu_tests_s5a.log"
echo "== swiglu sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 90 python3 bench/kernels/sweep_swiglu.py --out "$OUT/swiglu_sweep.json" \
  2>&1 | grep -E " full | forward | backward " | grep -E "8192x14336" | tail -30
echo "== kernel bench $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 200 python3 bench/kernels/run_all.py --only rope swiglu \
  fused_linear_cross_entropy --reps 20 --out /tmp/kernels_s5a.json 2>&1 | grep -vE "Warning|warn|Configuration class" | tail -40
cp /tmp/kernels_s5a.json "$OUT/kernels_s5a.json" 2>/dev/null
echo "== 8b 4x2048 $(date +%T)"
timeout $(( $(left 540) > 40 ? $(left 540) : 40 )) python3 bench/e2e/run_stack.py --stack ours --out "$OUT/v8b_4x2048.json" \
  --synthetic 8b --batch 4 --seq 2048 --ckpt on --warmup 2 --steps 5 --variants all,all+once 2>&1 \
  | grep -E "variant|loaded|Error|error" | tail -8
echo "== done $(date +%T)"
