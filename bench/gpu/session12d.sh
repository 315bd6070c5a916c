#!/usr/bin/env bash
# Session 12, call 2 (~530 s; carry .whl/core and .whl/anchors), issue 5: the e2e protocol for ours and Unsloth in one
# call with the input embedding in pinned host memory and the last 3 checkpointed layers keeping their MLP outputs
# (call 1: 4x2048 609.8 ms at 7.39 GiB against 619.4 ms at 7.98 without). 4x2048, packed 8192 and 1x2048 run ours as a
# recorded CUDA graph (train.cuda_graph); 1x16384 eagerly.
set -o pipefail
source bench/gpu/_env.sh
OURS="--stash-attention --dequantize-once --embeddings-on-host --keep-mlp-layers 3"
run_e2e e2e_s12d_graph "${BUDGET1:-335}" 4x2048,packed_8192,1x2048 "$OURS --cuda-graph"
run_e2e e2e_s12d_long "${BUDGET2:-175}" 1x16384 "$OURS"
echo "== done $(date +%T)"
