#!/usr/bin/env bash
# Session 10, call 3 (~540 s; carry .whl/core and .whl/anchors), issue 5: the e2e protocol at 1x16384 and 1x2048 for ours
# and Unsloth (1x65536 took ~420 s for the two in session 8: not in this budget) with this session's code. 1x2048 runs ours as a recorded CUDA graph (host-bound shape).
set -o pipefail
source bench/gpu/_env.sh
echo "== e2e long $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s ${BUDGET1:-330} --shapes 1x16384 --stacks ours,unsloth \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once" \
  --out "$OUT/e2e_s10c_long.json" 2>&1 | grep -v "Failed to query" | tail -20
echo "== e2e 1x2048 $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s ${BUDGET2:-170} --shapes 1x2048 --stacks ours,unsloth \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once --cuda-graph" \
  --out "$OUT/e2e_s10c_short.json" 2>&1 | grep -v "Failed to query" | tail -20
echo "== done $(date +%T)"
