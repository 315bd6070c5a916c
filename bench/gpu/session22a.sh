#!/usr/bin/env bash
# Prepared in session 21, not run (~150-250 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# The fused LoRA SwiGLU backward (kernels/lora_swiglu_grad.py, CPU-tested under the interpreter only):
# 1. its GPU bits test (gpu-marked: fused == unfused bit for bit at 4,096 x 14,336, rank 16, lean / gate kept /
#    finished); a failure means the GPU's dots sum otherwise than lora_pair's and the lean-vs-kept tests would break;
# 2. fused (BN:warps settings) against unfused at 65,536, 16,384 and 8,192 rows, with exactness and peak memory.
# Prediction: the bits test passes; at 65,536 rows the unfused lean backward ~6.5-7 ms (4.36 the kernel + ~2.5 the
# three lora_pair reads), fused 3.8-4.6 ms at its best setting (9.4 GB + 0.7 GB partials at 0.55-0.65 of copy), i.e.
# -2 to -3 ms a layer, -60 to -95 ms a step at 1x65536; peak +0.47 GiB (two more 235 MB partial buffers).
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 150 gpu_tests_s22a.log tests/kernels/test_lora_swiglu_grad.py
echo "== bench $(date +%T)"
timeout 240 python3 bench/kernels/bench_lora_swiglu_grad.py --rows 65536 16384 8192 \
  --out "$OUT/lora_swiglu_grad_s22a.json" 2>&1 | grep -vE '^\{' | tail -40
echo "== done $(date +%T)"
