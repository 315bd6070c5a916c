#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~260 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# A profiled eager step (after two warm-up steps) on packed rows and at 4x2048, the same tokens and the same flags
# (packed rows' e2e flags less the graph): where packed rows lose time. In session 24's e2e ours ran 633 ms a step on
# packed rows against 561 at 4x2048, whose flags keep 7 more layers and the weights on the host (~20 ms by session
# 17); attention through flash varlen is ~2 ms a layer by DESIGN.md's probe. Prediction, with kv shared since session
# 25: packed rows 0-30 ms slower at the same flags.
set -o pipefail
source bench/gpu/_env.sh
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --packed --batch 1 --seq 8192"
run_ours prof_packed_s26d 150 $FLAGS --warmup 2 --steps 2 --embeddings-on-host --last-layer-on-device --head-on-host \
  --keep-mlp-layers 6 --profile
run_ours prof_4x2048_s26d 150 --synthetic 8b --ckpt offload --stash-attention --dequantize-once --batch 4 --seq 2048 \
  --warmup 2 --steps 2 --embeddings-on-host --last-layer-on-device --head-on-host --keep-mlp-layers 6 --profile
echo "== done $(date +%T)"
