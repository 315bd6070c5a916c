#!/usr/bin/env bash
# Session 13, call 5 (~560 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim): issue 5's e2e protocol, ours and
# Unsloth in one call, with this session's fused residual adds (on by default) and the whole attention stash coming
# back early (session 12's timing). 4x2048, packed 8192 and 1x2048 as CUDA graphs with 4 kept MLP layers (call 4:
# 601.1 ms at 8.044 GiB with the later stash timing, 7.607 at keep3 with the early one); 1x16384 eager, keep 3.
set -o pipefail
source bench/gpu/_env.sh
timeout 60 python3 -m pytest -q -p no:cacheprovider "tests/models/test_checkpointing.py::test_selective_checkpointing_recomputes_only_the_first_layers" \
  tests/models/test_attention_stash.py 2>&1 | grep -E "passed|failed|FAILED" | tail -3 | tee "$OUT/gpu_tests_s13e.log"
OURS="--stash-attention --dequantize-once --embeddings-on-host"
run_e2e e2e_s13e_graph "${BUDGET1:-335}" 4x2048,packed_8192,1x2048 "$OURS --keep-mlp-layers 4 --cuda-graph"
run_e2e e2e_s13e_long "${BUDGET2:-175}" 1x16384 "$OURS --keep-mlp-layers 3"
echo "== done $(date +%T)"
