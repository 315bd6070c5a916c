#!/usr/bin/env bash
# Prepared in session 16, not run (~300 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The 4x2048 e2e against Unsloth and standard QLoRA in one call with KEEP_4K kept layers and the
# weights on the host (set KEEP_4K from session17a.sh's variants: the fastest at <= 8.05 GiB).
set -o pipefail
source bench/gpu/_env.sh
OURS="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host --weights-on-host"
echo "== e2e 4x2048 $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 320 --shapes 4x2048 --stacks ours,unsloth,std_qlora --ckpt-ours offload \
  --ours-flags "$OURS --keep-mlp-layers ${KEEP_4K:-6} --cuda-graph" \
  --out "$OUT/e2e_s17b.json" 2>&1 | grep -v "Failed to query" | tail -12
echo "== done $(date +%T)"
