#!/usr/bin/env bash
# Prepared in session 16, not run (~380 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The 1x65536 e2e, ours and Unsloth in one call, with FLAGS_64K from session17d.sh's choice
# (default: session 16's --keep-mlp-layers-on-host 12).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s17e_64k 370 1x65536 "--stash-attention --dequantize-once --mlp-chunk-tokens 0 --embeddings-on-host \
  --last-layer-on-device --head-on-host ${FLAGS_64K:---keep-mlp-layers 2 --keep-mlp-layers-on-host 12}"
echo "== done $(date +%T)"
