#!/usr/bin/env bash
# The fused kernels this script turns on (RAYTUNE_LLM_FUSED_MLP_PRODUCTS) were removed after session 22 (slower than
# the unfused kernels; bench/NOTES.md); the variable now changes nothing.
# Prepared in session 21, not run: session 22's call 1 found the fused kernels slower (~400 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The 1x65536 e2e, ours (the fused LoRA SwiGLU kernels, once session22a.sh has checked their
# bits and picked their tile) and Unsloth in one call. Session 21: 1.3029x (11,211.6 ms, 21.92 GiB), 1.3008x across two calls on one machine.
# Prediction: ours 70-110 ms faster than session 21's call 1 on a like machine, 1.311-1.316x; peak 21.92-22.40 GiB
# (the fused kernel's partials, if the peak is in an MLP backward), under Unsloth's 22.64.
set -o pipefail
source bench/gpu/_env.sh
export RAYTUNE_LLM_FUSED_MLP_PRODUCTS=1  # opt-in until this session's calls; the runs record it (fused_mlp_products)
run_e2e e2e_s22b_64k 440 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
