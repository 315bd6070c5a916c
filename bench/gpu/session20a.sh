#!/usr/bin/env bash
# Prepared in session 19, not run (~520 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). 1x2048 and packed rows with the current code against Unsloth and standard QLoRA in one call:
# session 19's call 6 ran ours alone (11,782 and 12,803 tokens/s; its budgets were too small for Unsloth). Session 13's
# and 14's flags. Prediction: ours within 1% of those figures; Unsloth 5,000-7,100 at 1x2048 (1.65-2.3x) and 7,800-8,600
# on packed rows (1.49-1.64x); losses within 0.005 of standard QLoRA's.
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s20a_1x2048 250 1x2048 "--stash-attention --dequantize-once --embeddings-on-host --keep-mlp-layers 4 \
--cuda-graph" ours,unsloth,std_qlora
run_e2e e2e_s20a_packed 270 packed_8192 "--stash-attention --dequantize-once --embeddings-on-host \
--last-layer-on-device --head-on-host --keep-mlp-layers 6 --cuda-graph" ours,unsloth,std_qlora
echo "== done $(date +%T)"
