#!/usr/bin/env bash
# Session 14, call 4 (~340 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim): packed 8192 (head on host, keep6) and
# 1x2048 (head on the device: at 2,048 tokens the streamed loss waits on its copies; keep4) against Unsloth, CUDA graphs.
set -o pipefail
source bench/gpu/_env.sh
OURS="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --cuda-graph"
run_e2e e2e_s14d_packed 175 packed_8192 "$OURS --head-on-host --keep-mlp-layers 6"
run_e2e e2e_s14d_1x2048 150 1x2048 "$OURS --keep-mlp-layers 4"
echo "== done $(date +%T)"
