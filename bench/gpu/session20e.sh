#!/usr/bin/env bash
# Session 20, call 1 (~500 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh):
# session20b's and session20c's calls as one: the 1x65536 e2e with conf/llama3_8b_qlora_64k.yaml's settings against
# Unsloth AND standard QLoRA, so the ratio and the losses come from the same call. Prediction: 1.295-1.31x Unsloth
# (session 19: 1.301, session 18 with one on-device layer 1.2985 / 1.297), losses within 0.001 of standard QLoRA's.
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s20e_64k 560 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0" ours,unsloth,std_qlora
echo "== done $(date +%T)"
