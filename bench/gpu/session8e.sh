#!/usr/bin/env bash
# Device call 5 of session 8 (~150 s, the budget's last 270 s), issue 5: the lean recompute without the LoRA SwiGLU
# forward kernel (the backward kernel finishes gate and up) on the GPU: its bit-for-bit tests, then 4x2048 and
# 1x16384 with the e2e settings, each with a profile step (the forward kernel's count should halve).
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py -k "lean or finishing" --timeout=50 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -6 | tee "$OUT/gpu_tests_s8e.log"
run_ours prof8b_4x2048_s8e 60 --synthetic 8b --batch 4 --seq 2048 --ckpt offload --stash-attention --dequantize-once \
  --warmup 2 --steps 6 --profile
run_ours prof8b_1x16384_s8e 50 --synthetic 8b --batch 1 --seq 16384 --ckpt offload --stash-attention --dequantize-once \
  --warmup 1 --steps 3 --profile
echo "== done $(date +%T)"
