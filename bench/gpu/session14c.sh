#!/usr/bin/env bash
# Session 14, call 3 (~520 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim): the head-on-host model test with its
# norm-based tolerance; the e2e at 4x2048 (ours: head on host, last layer on device, keep6, CUDA graph) against
# Unsloth and standard QLoRA (losses) in one call; 1x16384 (ours eager, keep4) against Unsloth.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/models/test_head_on_host.py --timeout=55 -rf --tb=short 2>&1 \
  | grep -E "passed|failed|FAILED|Error|assert" | tail -6 | tee "$OUT/gpu_tests_s14c.log"
OURS="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host"
echo "== e2e 4x2048 $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 270 --shapes 4x2048 --stacks ours,unsloth,std_qlora --ckpt-ours offload \
  --ours-flags "$OURS --keep-mlp-layers 6 --cuda-graph" --out "$OUT/e2e_s14c.json" 2>&1 | grep -v "Failed to query" | tail -12
run_e2e e2e_s14c_16k 200 1x16384 "$OURS --keep-mlp-layers 4"
echo "== done $(date +%T)"
