#!/usr/bin/env bash
# Prepared in session 18, not run (~370 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The 1x65536 e2e, ours with FLAGS_64K (session19b.sh's choice; export it) and Unsloth in the
# same call. Session 18: 1.2985x and 1.297x in two calls (1.3x needed 11,102 and 11,148 ms).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s19c_64k 420 1x65536 "${FLAGS_64K:---stash-attention --dequantize-once --last-layer-on-device 2 \
--keep-mlp-layers 2 --keep-mlp-layers-on-host 14 --keep-mlp-gate-on-host 1 --mlp-chunk-tokens 0}"
echo "== done $(date +%T)"
