#!/usr/bin/env bash
# Session 12, call 3 (~430 s; carry .whl/core and .whl/anchors), issue 5: 1x65536 for ours and Unsloth in one call (session
# 10 ran ours alone: 5,652 tokens/s; Unsloth's 4,527 is session 8's, another machine). Ours with the input embedding on
# the host and 2 kept MLP layers (3.76 GiB each at 65,536 tokens: 2 fit under Unsloth's 22.64 GiB, 3 would not).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s12c "${BUDGET:-540}" 1x65536 \
  "--stash-attention --dequantize-once --mlp-chunk-tokens 0 --embeddings-on-host --keep-mlp-layers 2"
echo "== done $(date +%T)"
