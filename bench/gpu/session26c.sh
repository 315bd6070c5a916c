#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~360 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# A profiled eager step (after two warm-up steps) on packed rows and at 4x2048, the same tokens and the same flags
# (packed rows' e2e flags less the graph): where packed rows lose time. In session 24's e2e ours ran 633 ms a step on
# packed rows against 561 at 4x2048, whose flags keep 7 more layers and the weights on the host (~20 ms by session
# 17); attention through flash varlen is ~2 ms a layer by DESIGN.md's probe. Prediction, with kv shared since session
# 25: packed rows 0-30 ms slower at the same flags.
# First, packed attention alone (bench/gpu/probe_packed_attention.py): flash varlen with kv repeated (ours to session
# 24) and shared (ours since session 25), cuDNN's ragged layout through the aten ops (torch's varlen keeps it off) and
# causal cuDNN once per document, forward + backward at 6, 11 and 32 documents in 8,192 tokens. Prediction: flash
# varlen repeated ~1.9 ms (DESIGN.md: 1.91 at 8 documents), shared 0.1-0.3 ms less; cuDNN's ragged layout 1.0-1.5 ms
# or an error; per document 3-4 ms at 6 documents.
set -o pipefail
source bench/gpu/_env.sh
timeout 150 python3 bench/gpu/probe_packed_attention.py --out "$OUT/packed_attention_s26c.json" 2>&1 | tail -14
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --packed --batch 1 --seq 8192"
run_ours prof_packed_s26c 150 $FLAGS --warmup 2 --steps 2 --embeddings-on-host --last-layer-on-device --head-on-host \
  --keep-mlp-layers 6 --profile
run_ours prof_4x2048_s26c 150 --synthetic 8b --ckpt offload --stash-attention --dequantize-once --batch 4 --seq 2048 \
  --warmup 2 --steps 2 --embeddings-on-host --last-layer-on-device --head-on-host --keep-mlp-layers 6 --profile
echo "== done $(date +%T)"
