#!/usr/bin/env bash
# Session 23 call 5 (~400 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh): the
# 1x65536 e2e again (session23d.sh's), on another machine: call 4 gave 1.2968x with ours at 11,104.4 ms, the fastest
# ours has run, and Unsloth at 14,398.7 ms, also its fastest (both ~1.4% under session 22's call). Prediction:
# 1.297-1.306x.
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s23e_64k 440 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
