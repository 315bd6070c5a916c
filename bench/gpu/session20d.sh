#!/usr/bin/env bash
# Prepared in session 19, not run (~480-600 s: the first warm-up step reads 54-93 s; carry .whl/slim, WHEELS=.whl/slim
# exported BEFORE sourcing _env.sh).
# Session 19 could not resolve a 15th layer's gate output alone on the host at 1x65536 (one process each, 2 timed
# steps: +34.7 ms, while the e2e without it read the gate variant's figure). Interleaved A B A B, 4 timed steps
# each. Prediction: B 8-11 ms faster than A in both pairs (the up GEMM alone in its recompute, ~10.5 ms).
set -o pipefail
source bench/gpu/_env.sh
A="all+once+stash+lastdev2+keep2+hostkeep14"
F="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --mlp-chunk-tokens 0 --batch 1 --seq 65536 \
--warmup 1 --steps 4"
for round in 1 2; do
  run_each "var_1x65536_s20d$round" 190 "$F" "$A" "$A+hostgate1"
done
for round in 1 2; do
  for t in lastdev2_keep2_hostkeep14 lastdev2_keep2_hostkeep14_hostgate1; do
    show_variants "s20d${round}_$t" 1x65536
  done
done
echo "== done $(date +%T)"
