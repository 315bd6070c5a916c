#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~280 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing
# _env.sh). Ours on packed rows, one process, 6 timed steps a variant: session 14's packed flags (keep6; 633 ms a step
# in session 24 with kv repeated), the 4x2048 settings (weights on the host, 10 and 13 layers kept), keep6 again, then
# keep6 with cuDNN's ragged layout, kv shared and repeated. Run in session 26 (call 2) without the two cuDNN variants:
# 26a's probe and GPU tests found its dq and dk wrong and its step ~80x slower than flash varlen.
# Prediction: keep6 575-625 ms (kv shared: ~2.9 GB a step less through the stash's copies, in a forward whose copies
# filled 86% of it at 4x2048; the recorded step tells attention 4,096 as the longest document, not 8,192); +wh -5 to -15 ms (session 17 at 4x2048: +wh keep13 -11 ms against keep6); cuDNN's
# ragged layout -10 to -25 ms against keep6 if 26a's probe puts it 0.3-0.8 ms a layer under flash, or an error.
set -o pipefail
source bench/gpu/_env.sh
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --packed --batch 1 --seq 8192"
V="all+once+stash+host+lastdev+headhost"
run_ours var_packed_s26b 260 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep6+graph,$V+wh+keep10+graph,$V+wh+keep13+graph,$V+keep6+graph"
show_variants s26b packed
echo "== done $(date +%T)"
