#!/usr/bin/env bash
# Session 16, call 4 (~330 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# Call 3 (session16c.sh): +hostkeep12 at 1x65536 11,248 ms (11,237 / 11,259; peak 19.77 GiB); +hostkeep16 was killed
# with the host's memory full (128.5 GB used); its e2e ran +hostkeep8 (11,345 ms) and the budget skipped Unsloth. Here
# the 1x65536 e2e, ours with +hostkeep12 and Unsloth, in one call (prediction: ~11,200-11,300 ms against Unsloth's
# 14,644 in session 15: 1.30-1.31x).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s16d_64k 365 1x65536 "--stash-attention --dequantize-once --mlp-chunk-tokens 0 --embeddings-on-host \
  --last-layer-on-device --head-on-host --keep-mlp-layers 2 --keep-mlp-layers-on-host 12"
echo "== done $(date +%T)"
