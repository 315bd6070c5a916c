#!/usr/bin/env bash
# Session 17, call 5 (~560 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# The e2e against Unsloth at 1x65536 with +hostkeep13 (call 4: 11,138.6 ms, 117.56 GiB pinned) and at 1x16384 with
# the weights on the host, keep6 + hostkeep8 (call 4: 1,508.6 ms against 1,520.9 for keep4 + hostkeep8).
set -o pipefail
source bench/gpu/_env.sh
COMMON="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host"
run_e2e e2e_s17g_64k 340 1x65536 "$COMMON --mlp-chunk-tokens 0 --keep-mlp-layers 2 --keep-mlp-layers-on-host 13"
run_e2e e2e_s17g_16k 200 1x16384 "$COMMON --weights-on-host --keep-mlp-layers 6 --keep-mlp-layers-on-host 8"
echo "== done $(date +%T)"
