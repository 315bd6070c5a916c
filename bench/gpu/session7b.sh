#!/usr/bin/env bash
# Device call 2 of session 7 (~480 s), issue 5 (and issue 3's LoRA SwiGLU kernels): GPU tests of the attention
# stash, lean Q/K/V and the [B, S, H, D] RoPE output; the fused LoRA SwiGLU launch sweep; the stash variants at
# 4x2048, 1x16384, packed 8192 and 1x65536 on one loaded 8B-shaped model each; a profile of the 4x2048 step.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_checkpointing.py tests/kernels/test_rope.py \
  --timeout=150 -rf 2>&1 | grep -E "passed|failed|FAILED|Error|error" | tail -12 | tee "$OUT/gpu_tests_s7b.log"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py -k "lean" --timeout=50 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -6 | tee -a "$OUT/gpu_tests_s7b.log"
echo "== lora swiglu sweep $(date +%T)"
timeout 60 python3 bench/kernels/sweep_lora_swiglu.py --out "$OUT/lora_swiglu_sweep.json" 2>&1 | tail -3
run_ours v8b_4x2048_s 80 --synthetic 8b --batch 4 --seq 2048 --ckpt offload --warmup 2 --steps 6 \
  --variants all,all+stash,all+once,all+once+stash
run_ours v8b_1x16384_s 80 --synthetic 8b --batch 1 --seq 16384 --ckpt offload --warmup 1 --steps 3 \
  --variants all,all+stash,all+once+stash
run_ours v8b_packed_s 60 --synthetic 8b --batch 1 --seq 8192 --packed --ckpt offload --warmup 2 --steps 6 \
  --variants all,all+stash,all+once+stash
run_ours v8b_1x65536_s 120 --synthetic 8b --batch 1 --seq 65536 --ckpt offload --warmup 1 --steps 1 \
  --variants all+chunk0,all+stash+chunk0
run_ours prof8b_4x2048_s 60 --synthetic 8b --batch 4 --seq 2048 --ckpt offload --stash-attention --dequantize-once \
  --warmup 2 --steps 2 --profile
echo "== done $(date +%T)"
