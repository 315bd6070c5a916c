#!/usr/bin/env bash
# Session 23 call 6 (~330 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh): the
# 4x2048 and 1x16384 e2e, ours (row-span LoRA SwiGLU kernels) and Unsloth in one call, session22c.sh's settings less
# standard QLoRA, for time (the kernels give the bits of the ones they replace; session 22: within 0.00144). Prediction
# from call 3's kernel times: 4x2048 ~7 ms a step faster than session 22's 567.3 ms (1.32-1.34x), 1x16384 ~12 ms
# faster than 1,501.2 (1.32-1.34x); peaks unchanged (7.87, 8.72 GiB).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s23f_4x2048 220 4x2048 "--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device \
--head-on-host --weights-on-host --keep-mlp-layers 13 --cuda-graph"
run_e2e e2e_s23f_16k 200 1x16384 "--stash-attention --dequantize-once --embeddings-on-host --head-on-host \
--weights-on-host --last-layer-on-device 2 --keep-mlp-layers 6 --keep-mlp-layers-on-host 8 --offload-lag 3"
echo "== done $(date +%T)"
