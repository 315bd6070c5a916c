#!/usr/bin/env bash
# Session 12, call 5 (~140 s; carry .whl/slim and .whl/anchors): Unsloth at 1x2048 beside call 4's ours (same machine,
# still held), resuming call 4's 1x2048 file.
set -o pipefail
source bench/gpu/_env.sh
python3 bench/e2e/bench_e2e.py --budget-s "${BUDGET:-150}" --shapes 1x2048 --stacks ours,unsloth --ckpt-ours offload \
  --ours-flags "--stash-attention --dequantize-once --embeddings-on-host --keep-mlp-layers 3 --cuda-graph" \
  --resume-from bench/results/e2e_h200_20261129_s12e_1x2048.json --out "$OUT/e2e_s12f.json" 2>&1 \
  | grep -v "Failed to query" | tail -10
echo "== done $(date +%T)"
