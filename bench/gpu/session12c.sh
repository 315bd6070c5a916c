#!/usr/bin/env bash
# Session 12, call 3 (~540 s; carry .whl/core and .whl/anchors), issue 5: 1x65536 for ours and Unsloth in one call (session
# 10 ran ours alone: 5,652 tokens/s; Unsloth's 4,527 is session 8's, another machine). Ours with the input embedding on
# the host and 2 kept MLP layers (3.76 GiB each at 65,536 tokens: 2 fit under Unsloth's 22.64 GiB, 3 would not).
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 75 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/models/test_memory_settings.py \
  tests/kernels/test_embedding.py --timeout=60 -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6 \
  | tee "$OUT/gpu_tests_s12c.log"
run_e2e e2e_s12c "${BUDGET:-460}" 1x65536 \
  "--stash-attention --dequantize-once --mlp-chunk-tokens 0 --embeddings-on-host --keep-mlp-layers 2"
echo "== done $(date +%T)"
