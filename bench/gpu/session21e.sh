#!/usr/bin/env bash
# Session 21 (~560 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh). Today's
# code with session 21's LoRA SwiGLU launch settings (lora_swiglu._FWD_H / _BWD: 16x128x4, column blocks first from
# 32,768 rows): the 1x65536 e2e (call 1, `session21c.sh`, before them: 1.3029x, 11,211.6 ms, 21.92 GiB), then 1x16384
# with conf/llama3_8b_qlora_16k.yaml's settings (session 19: 1.315x, 10,854 tokens/s, 8.63 GiB).
# Predictions: 1x65536 ours 8-14 ms faster than call 1 on a like machine (the sweep's -0.18 ms a lean backward and
# -0.21 ms an H-only forward, 32 each), 1.300-1.307x, ~21.92 GiB; 1x16384 1.31-1.32x, 8.7-8.9 GiB (+ the kept X A^T).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s21e_64k 420 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
run_e2e e2e_s21e_16k 160 1x16384 "--stash-attention --dequantize-once --embeddings-on-host --head-on-host \
--weights-on-host --last-layer-on-device 2 --keep-mlp-layers 6 --keep-mlp-layers-on-host 8 --offload-lag 3"
echo "== done $(date +%T)"
