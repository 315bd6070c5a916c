#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~200 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# Ours on packed rows with the 4x2048 settings (weights on the host, more layers kept), one process, 6 timed steps a
# variant. Prediction (session 17 at 4x2048: +wh keep13 -11 ms against keep6, peak 8.02 GiB): -5 to -15 ms, +wh
# keep10 under Unsloth's 7.67 GiB. (Run after 26a: ours' keep6 there and here within 1%.)
set -o pipefail
source bench/gpu/_env.sh
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --packed --batch 1 --seq 8192"
V="all+once+stash+host+lastdev+headhost"
run_ours var_packed_s26b 200 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep6+graph,$V+wh+keep10+graph,$V+wh+keep13+graph,$V+keep6+graph"
show_variants s26b packed
echo "== done $(date +%T)"
