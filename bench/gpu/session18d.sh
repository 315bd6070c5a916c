#!/usr/bin/env bash
# Session 18, call 4 (~400 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# The 1x65536 e2e again with call 1's fastest variant (tables on the GPU, keep2 +hostkeep14: 11,110.4 ms in call 1,
# 11,114.9 in call 2's e2e against Unsloth's 14,432.8: 1.2985x; 1.3x needs 11,102), ours and Unsloth in one call, a
# second sample of the same settings on another machine. Then the GPU test whose generate stopped at an EOS token
# in call 1 (now min_new_tokens), cut at 60 s if the call's time runs out.
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s18d_64k 420 1x65536 "--stash-attention --dequantize-once --last-layer-on-device --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
gpu_tests 60 gpu_tests_s18d.log tests/models/test_host_weights.py
echo "== done $(date +%T)"
