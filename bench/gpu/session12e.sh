#!/usr/bin/env bash
# Session 12, call 4 (~330 s; carry .whl/slim and .whl/anchors), issue 5: the kept-MLP GPU test as fixed after call 3, then
# the e2e protocol at 1x16384 (ours eager) and 1x2048 (ours recorded as a CUDA graph) for ours and Unsloth, with call 2's
# settings (host embedding, 3 kept MLP layers).
set -o pipefail
source bench/gpu/_env.sh
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/models/test_memory_settings.py -k kept --timeout=50 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -4 | tee "$OUT/gpu_tests_s12e.log"
OURS="--stash-attention --dequantize-once --embeddings-on-host --keep-mlp-layers 3"
run_e2e e2e_s12e_long "${BUDGET1:-200}" 1x16384 "$OURS"
run_e2e e2e_s12e_short "${BUDGET2:-110}" 1x2048 "$OURS --cuda-graph"
echo "== done $(date +%T)"
