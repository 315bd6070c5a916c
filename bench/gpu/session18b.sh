#!/usr/bin/env bash
# Prepared in session 17, not run (~360 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The 1x65536 e2e, ours with FLAGS_64K (session18a.sh's choice) and Unsloth in the same call; the
# budget leaves Unsloth its ~185 s after ours' ~145 (session 17's 340 s did not, and Unsloth was skipped).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s18b_64k 420 1x65536 "${FLAGS_64K:---stash-attention --dequantize-once --embeddings-on-host \
--last-layer-on-device --head-on-host --mlp-chunk-tokens 0 --keep-mlp-layers 2 --keep-mlp-layers-on-host 13}"
echo "== done $(date +%T)"
