#!/usr/bin/env bash
# Session 21 (~150 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh). The profiled 1x65536 step
# (session21a.sh, prof_1x65536_s21a) ran `_lora_swiglu_bwd_kernel` at 145 ms (4.53 ms a layer: 11.3 GB moved, 0.60 of
# the copy rate) and `_lora_swiglu_fwd_kernel` at 88 ms. Session 10 swept the tiles at 8,192 rows only. Here the
# same sweep at 65,536, 16,384 and 8,192 rows, with the grid walking column blocks first (`:1`) as a new setting.
# Prediction: some setting at 65,536 reaches 0.70-0.80 of the copy rate on the lean backward (-15 to -35 ms a step).
set -o pipefail
source bench/gpu/_env.sh
S="16:128:2,16:128:4,16:128:2:1,16:128:4:1,32:128:4:1,16:256:4:1,8:256:2:1,32:256:8:1,64:128:8:1,64:64:4:1,32:128:4,16:256:4"
for n in 65536 16384 8192; do
  echo "== rows $n $(date +%T)"
  timeout 150 python3 bench/kernels/sweep_lora_swiglu.py --rows $n --settings "$S" --out "$OUT/lora_swiglu_sweep_s21d_$n.json" \
    2>&1 | grep -E "best|Error|error" | cut -c1-220
done
echo "== done $(date +%T)"
