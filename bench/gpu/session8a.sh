#!/usr/bin/env bash
# Device call 1 of session 8 (~450 s), issue 5: the CUDA-graph step (models.graphs.CapturedStep) on the GPU (its
# tests: replay trains like the eager loop under off / on / offload checkpointing, less host time), the session-7
# changes that only ran on the CPU (HostCopies for offloaded layer inputs, the stash leak fix, strided RoPE), then
# the host-bound 1x2048 and the headline 4x2048 with and without the graph, on one loaded 8B-shaped model each.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_graphs.py tests/models/test_checkpointing.py \
  tests/models/test_attention_stash.py --timeout=120 -rf 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -12 \
  | tee "$OUT/gpu_tests_s8a.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py -k lean tests/kernels/test_rope.py \
  --timeout=100 -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -8 | tee -a "$OUT/gpu_tests_s8a.log"
run_ours v8b_1x2048_s8 110 --synthetic 8b --batch 1 --seq 2048 --ckpt on --warmup 2 --steps 8 \
  --variants all+on,all+on+graph,all+on+once+graph,all+offload+once+stash,all+offload+once+stash+graph
run_ours v8b_4x2048_s8 130 --synthetic 8b --batch 4 --seq 2048 --ckpt offload --warmup 2 --steps 6 \
  --variants all+offload+once+stash,all+offload+once+stash+graph,all+on+once+graph
echo "== done $(date +%T)"
