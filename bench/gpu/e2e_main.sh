#!/usr/bin/env bash
# Device call: the end-to-end protocol of ANCHORS.md at 8B shapes, all four stacks, most important shapes first.
set -o pipefail
source bench/gpu/_env.sh
RES=/tmp/rtl_bench/e2e_main.json
RESUME=""; [ -f "$RES" ] && RESUME="--resume-from $RES"
python3 bench/e2e/bench_e2e.py --budget-s ${BUDGET:-545} --shapes ${SHAPES:-4x2048,1x2048,packed_8192,1x16384,1x65536} \
  --stacks ours,unsloth,std_qlora,liger --out "$RES" $RESUME 2>&1 | grep -v "Failed to query" | tail -60
cp "$RES" "$OUT/e2e_main.json"
