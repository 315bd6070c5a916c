#!/usr/bin/env bash
# Session 10, call 2 (~540 s; carry .whl/core and .whl/anchors), issue 5: the e2e protocol at 4x2048 and packed 8192
# for all four stacks with this session's code (the O projection inside the attention stash, the LoRA SwiGLU tiles).
# Standard QLoRA and Liger have not been measured on packed rows before.
set -o pipefail
source bench/gpu/_env.sh
echo "== e2e $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s ${BUDGET:-530} --shapes 4x2048,packed_8192 --stacks ours,unsloth,std_qlora,liger \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once" --out "$OUT/e2e_s10b.json" 2>&1 \
  | grep -v "Failed to query" | tail -30
echo "== done $(date +%T)"
