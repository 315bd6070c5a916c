#!/usr/bin/env bash
# Prepared in session 15, not run (~260 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing
# _env.sh). The 4x2048 e2e against Unsloth and standard QLoRA in one call, with HOSTKEEP_4K host-kept layers (the best
# of session16a.sh's variants; default none).
set -o pipefail
source bench/gpu/_env.sh
OURS="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host"
echo "== e2e 4x2048 $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 300 --shapes 4x2048 --stacks ours,unsloth,std_qlora --ckpt-ours offload \
  --ours-flags "$OURS --keep-mlp-layers 6 --keep-mlp-layers-on-host ${HOSTKEEP_4K:-0} --cuda-graph" \
  --out "$OUT/e2e_s16c.json" 2>&1 | grep -v "Failed to query" | tail -12
echo "== done $(date +%T)"
