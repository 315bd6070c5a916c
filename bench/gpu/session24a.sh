#!/usr/bin/env bash
# Prepared in session 23, not yet run (~480 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh): 1x2048 and packed rows, ours and Unsloth in one call at the row-span LoRA SwiGLU kernels (their
# latest same-call figures are session 20's, code 38687b6), the model built before the budgets (run_e2e). Prediction:
# 1x2048 1.6-2.3x (Unsloth's one-row step moves with the host), packed rows 1.62-1.68x. First the whole LoRA kernel
# test file on the GPU (~60 s): its span test is not in the `gpu` selection, and session 23 ran the row-span kernels
# on a GPU only at shapes that fill their spans.
set -o pipefail
source bench/gpu/_env.sh
echo "== tests/kernels/test_lora.py on the GPU $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py 2>&1 | tee "$OUT/test_lora_s24a.log" | tail -3
run_e2e e2e_s24a_1x2048 170 1x2048 "--stash-attention --dequantize-once --embeddings-on-host --keep-mlp-layers 4 \
--cuda-graph" ours,unsloth
run_e2e e2e_s24a_packed 190 packed_8192 "--stash-attention --dequantize-once --embeddings-on-host \
--last-layer-on-device --head-on-host --keep-mlp-layers 6 --cuda-graph" ours,unsloth
echo "== done $(date +%T)"
