#!/usr/bin/env bash
# Session 24 calls 5 and 6 (~380 s each; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing
# _env.sh): 1x65536 ours and Unsloth in one call at the row-span LoRA SwiGLU kernels, the conf's settings
# (conf/llama3_8b_qlora_64k.yaml), the model built before the budget. Session 23 ran this code twice: 1.2968x and
# 1.3083x. Prediction: 1.296-1.310x; the ratio moves with the machine by about as much as its margin.
set -o pipefail
source bench/gpu/_env.sh
run_e2e "e2e_s24${1:-d}_64k" 440 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 \
--keep-mlp-layers 2 --keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
