#!/usr/bin/env bash
# Prepared in session 10 (as session11a.sh), not run yet: 1x65536 for ours and Unsloth in one call with the current code (session
# 10 ran ours alone: 5,652 tokens/s; Unsloth's 4,527 is session 8's, another machine). ~430 s; carry .whl/core and
# .whl/anchors.
set -o pipefail
source bench/gpu/_env.sh
echo "== e2e 1x65536 $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s ${BUDGET:-540} --shapes 1x65536 --stacks ours,unsloth \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once --mlp-chunk-tokens 0" \
  --out "$OUT/e2e_s11a.json" 2>&1 | grep -v "Failed to query" | tail -16
echo "== done $(date +%T)"
