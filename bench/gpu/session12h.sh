#!/usr/bin/env bash
# Session 12, call 7 (~230 s; carry .whl/slim): 4x2048 for ours (call 2's settings: host embedding, keep3, CUDA graph)
# and standard QLoRA in one call, for the loss comparison of the settings the README reports.
set -o pipefail
source bench/gpu/_env.sh
python3 bench/e2e/bench_e2e.py --budget-s "${BUDGET:-215}" --shapes 4x2048 --stacks ours,std_qlora --ckpt-ours offload \
  --ours-flags "--stash-attention --dequantize-once --embeddings-on-host --keep-mlp-layers 3 --cuda-graph" \
  --out "$OUT/e2e_s12h.json" 2>&1 | grep -v "Failed to query" | tail -8
echo "== done $(date +%T)"
