#!/usr/bin/env bash
# Prepared in session 19, not run (~360 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The 1x65536 e2e again with conf/llama3_8b_qlora_64k.yaml's settings (session 19: 1.301x, one
# call; 7 ms of margin). Run it on two machines (two sessions, or this and a fresh one) before calling the goal held.
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s20b_64k 420 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
