#!/usr/bin/env bash
# Prepared in session 18, not run (~420 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The GPU test session 18's budget cut (test_host_weights.py: generate now asks for
# min_new_tokens), then the 1x65536 e2e with session 18's settings (tables on the GPU, keep2 +hostkeep14: 1.2985x and
# 1.297x in two calls; 1.3x needed 11,102 and 11,148 ms) and a second on-device layer, which session 18 measured
# costs no GPU memory at the peak (+0.01 GiB) and frees 2.27 GiB of host memory (not enough for a 15th host-kept
# layer, 3.5). Prediction: 0 to -15 ms (one layer's input and stash off the PCIe link each way).
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 60 gpu_tests_s19b.log tests/models/test_host_weights.py
run_e2e e2e_s19b_64k 420 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
