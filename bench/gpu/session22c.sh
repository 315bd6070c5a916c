#!/usr/bin/env bash
# Prepared in session 21, ran as session 22's call 4 with FUSED unset (298 s, warm; ~330 s + the model build on a fresh
# machine; carry .whl/slim and .whl/anchors,
# WHEELS=.whl/slim exported BEFORE sourcing _env.sh). 4x2048 and 1x16384 against Unsloth with the code of session 21
# (the lora_swiglu launch settings, the kept X A^T, the RoPE-less stashed recompute) and the fused SwiGLU kernels if
# session22a/b kept them (FUSED=1 bash bench/gpu/session22c.sh): their latest same-call figures are session 19's
# (4x2048 1.319x at 68.6% MFU, 7.83 / 8.05 GiB; 1x16384 1.315x, 8.63 / 10.08 GiB).
# Predictions, fused off: 4x2048 1.31-1.33x, peak 7.83-7.87 GiB; 1x16384 1.31-1.33x, 8.72 GiB (session 21 ours alone:
# 11,092 tokens/s). Fused on: 4x2048 -1 to -3 ms a step (8,192 tokens: ~1/8 of 1x65536's saving a layer), 1x16384
# -15 to -25 ms; peaks +0.06 and +0.12 GiB at most. Best on the machine session22b.sh warmed (its model folder is
# there); on a fresh one the model build comes out of the first budget and may skip standard QLoRA.
set -o pipefail
source bench/gpu/_env.sh
[ "${FUSED:-0}" = 1 ] && export RAYTUNE_LLM_FUSED_MLP_PRODUCTS=1
run_e2e e2e_s22c_4x2048 300 4x2048 "--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device \
--head-on-host --weights-on-host --keep-mlp-layers 13 --cuda-graph" ours,unsloth,std_qlora
run_e2e e2e_s22c_16k 200 1x16384 "--stash-attention --dequantize-once --embeddings-on-host --head-on-host \
--weights-on-host --last-layer-on-device 2 --keep-mlp-layers 6 --keep-mlp-layers-on-host 8 --offload-lag 3"
echo "== done $(date +%T)"
