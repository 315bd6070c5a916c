#!/usr/bin/env bash
# Prepared at the end of session 9, not run: the e2e protocol at packed 8192 and 4x2048 for all four stacks on the
# current code (session 9's call ran out of budget after ours at packed 8192; standard QLoRA and Liger have never run
# on packed rows). ~560 s: carry .whl/core and .whl/anchors.
set -o pipefail
source bench/gpu/_env.sh
echo "== e2e $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s ${BUDGET:-540} --shapes packed_8192,4x2048 --stacks ours,unsloth,std_qlora,liger \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once" --out "$OUT/e2e_s10a.json" 2>&1 \
  | grep -v "Failed to query" | tail -30
echo "== done $(date +%T)"
