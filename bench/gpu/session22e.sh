#!/usr/bin/env bash
# Session 22 (~440 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh): the
# 1x65536 e2e, ours (the default, unfused kernels: session22a/d found the fused SwiGLU kernels 1.0-2.2x slower) and
# Unsloth in one call, one more same-call ratio for the 0.2% margin. Session 21: 1.3029x (s21c), 1.3008x across two
# calls (s21e + s21f, with the SwiGLU launch settings this code has). Prediction: 1.296-1.306x, ours 21.92 GiB.
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s22e_64k 440 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
