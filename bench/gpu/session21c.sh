#!/usr/bin/env bash
# Prepared in session 20, not run (~350 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The 1x65536 e2e with conf/llama3_8b_qlora_64k.yaml's settings and session 20's code after its
# calls (no RoPE forward in a stashed lean recompute; the adapters' X A^T kept for the recompute). Session 20:
# 1.3003x and 1.2995x (11,186.4 / 11,166.0 ms). Prediction: ours 18-26 ms faster than those calls on a like machine,
# the ratio 1.301-1.305, the peak ~22.06 GiB (21.75 + the kept X A^T).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s21c_64k 440 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
