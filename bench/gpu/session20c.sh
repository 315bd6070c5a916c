#!/usr/bin/env bash
# Prepared in session 19, not run (~420 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). 1x65536 ours against standard QLoRA in one call, for the losses (session 1's standard run is the
# only one at this shape: 116.8 GiB, ~18 s a step). Prediction: within 0.001 over the timed steps.
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s20c_64k_std 560 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 \
--keep-mlp-layers 2 --keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0" ours,std_qlora
echo "== done $(date +%T)"
