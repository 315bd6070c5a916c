#!/usr/bin/env bash
# Prepared in session 20, not run (~560 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# 1x65536 stands at 1.3003x and 1.2995x (session 20's two calls): the goal needs ~60-110 ms more to hold with a margin.
# By arithmetic (not a profile) the 11,166 ms step is attention 7,10x ms (cuDNN, 32 x 222 ms forward + backward in
# bench/results/sdpa_layouts_s20h_*), GEMMs ~3,300-3,450 ms (2,184 TFLOP at the call's 668 TFLOP/s), ~600 ms the rest.
# 1. A profiled step at 1x65536 with the conf's settings, hostkeep12 instead of 14 (the profiler's own host memory:
#    session 19 used 121.3 of 125.87 GiB), by kind (bench/e2e/timeline.py kernel_categories) and the compute stream's
#    idle time. Prediction: attention ~7,100 ms, gemm ~3,400, gemm_thin + triton + torch_elementwise ~500-700, idle on
#    the compute stream < 150 ms.
# 2. The same at 1x16384 with conf/llama3_8b_qlora_16k.yaml's settings (prediction: attention ~420 ms, gemm ~850).
set -o pipefail
source bench/gpu/_env.sh
F="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --mlp-chunk-tokens 0"
run_ours prof_1x65536_s21a 300 $F --batch 1 --seq 65536 --warmup 1 --steps 1 --last-layer-on-device 2 \
  --keep-mlp-layers 2 --keep-mlp-layers-on-host 12 --profile
run_ours prof_1x16384_s21a 200 $F --batch 1 --seq 16384 --warmup 2 --steps 2 --embeddings-on-host --head-on-host \
  --weights-on-host --last-layer-on-device 2 --keep-mlp-layers 6 --keep-mlp-layers-on-host 8 --offload-lag 3 --profile
echo "== done $(date +%T)"
