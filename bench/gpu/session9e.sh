#!/usr/bin/env bash
# Session 9, call 5 (~430 s), issue 5: the e2e protocol at 1x16384 and packed 8192 for all four stacks with this
# session's code (standard QLoRA and Liger had not been measured at these shapes).
set -o pipefail
source bench/gpu/_env.sh
echo "== e2e $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s ${BUDGET:-390} --shapes 1x16384,packed_8192 --stacks ours,unsloth,std_qlora,liger \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once" --out "$OUT/e2e_s9e.json" 2>&1 \
  | grep -v "Failed to query" | tail -30
echo "== done $(date +%T)"
