#!/usr/bin/env bash
# Session 23 call 4 (~540 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh): the
# 1x65536 e2e, ours (row-span LoRA SwiGLU kernels at 16:128:4:3:32) and Unsloth in one call, the conf's settings.
# Prediction: the MLP kernels of a step ~51 ms faster (call 3: 18 layers' forward and backward on finished G and U,
# -1.31 ms each; 14 lean layers' H-only forward and finishing backward, -1.93 ms each): ours ~11,210 ms against
# session 22's 11,259.9, 1.300-1.310x; peak 21.93 GiB (the kernels allocate nothing new).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s23d_64k 440 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
