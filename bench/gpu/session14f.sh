#!/usr/bin/env bash
# Session 14, last call (~240 s; carry .whl/slim, WHEELS=.whl/slim): the review's mends and the SwiGLU backward
# summing its rank-r products (kernels.lora_swiglu products=): GPU tests of the LoRA kernels, the streamed loss and
# the head-on-host model; the kernel forms timed at 8192 x 14336; 4x2048 CUDA-graph step with and without the sums.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py tests/kernels/test_cross_entropy_streamed.py \
  tests/models/test_head_on_host.py --timeout=100 -rf --tb=line 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -10 \
  | tee "$OUT/gpu_tests_s14f.log"
timeout 40 python3 bench/kernels/sweep_lora_swiglu.py --settings 16:128:4 --out "$OUT/lora_swiglu_products_s14f.json" 2>&1 \
  | grep -E "best" | tail -6
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev+headhost+keep6"
run_ours var_4x2048_s14f 85 $FLAGS --warmup 3 --steps 6 --variants "$V+graph,$V+noprod+graph"
show_variants s14f 4x2048
echo "== done $(date +%T)"
