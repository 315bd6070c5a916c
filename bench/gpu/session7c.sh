#!/usr/bin/env bash
# Device call 3 of session 7 (~560 s), issues 3 and 5: the fused LoRA tests on the GPU (the new SwiGLU forward
# tile, the lean Q/K/V test with its CUDA tolerance), then the end-to-end protocol (bench_e2e.py, each stack in
# its own process) on the headline shapes, ours with offloaded checkpointing, the attention stash and
# dequantize_once.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py --timeout=90 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -8 | tee "$OUT/gpu_tests_s7c.log"
echo "== e2e $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 430 --shapes 4x2048,1x2048,packed_8192 --stacks ours,unsloth,std_qlora,liger \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once" --out /tmp/e2e_s7c.json 2>&1 \
  | grep -v "Failed to query" | tail -30
cp /tmp/e2e_s7c.json "$OUT/e2e_s7c.json" 2>/dev/null
echo "== done $(date +%T)"
