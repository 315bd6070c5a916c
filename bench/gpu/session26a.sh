#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~450 s on a fresh machine; carry .whl/slim, WHEELS=.whl/slim exported
# BEFORE sourcing _env.sh). Packed rows, ours alone; session26b.sh then runs the e2e with the fastest variant's flags.
# 1. The GPU tests of the packed kernels (flash varlen with kv shared since session 25, cuDNN's ragged layout with kv
#    shared and repeated; each against the dense mask, forward and gradients, bounds read on the host and found on
#    the GPU as a capture does) and of the replay warm-up (`run_stack --replay-warmup` with a recorded step).
# 2. Packed attention alone (bench/gpu/probe_packed_attention.py): flash varlen with kv repeated (ours to session 24)
#    and shared, cuDNN's ragged layout (`models.attention._CudnnRagged`) with kv repeated and shared, and causal
#    cuDNN once per document, forward + backward at 6, 11 and 32 documents in 8,192 tokens, and 6 with 10 empty ones
#    after them (a CUDA graph's bounds). Prediction: flash varlen repeated ~1.9 ms (DESIGN.md: 1.91 at 8 documents),
#    shared 0.1-0.3 ms less; cuDNN's ragged layout 1.0-1.5 ms or an error; per document 3-4 ms at 6 documents.
# 3. Ours on packed rows, one process, 6 timed steps a variant: session 14's packed flags (keep6; 633 ms a step in
#    session 24 with kv repeated), the 4x2048 settings (weights on the host, 10 and 13 layers kept), keep6 again, then
#    keep6 with cuDNN's ragged layout, kv shared and repeated (last: a kernel error may leave the context unusable).
#    Prediction: keep6 585-625 ms (kv shared: ~2.9 GB a step less through the stash's copies, in a forward whose copies
#    filled 86% of it at 4x2048); +wh -5 to -15 ms (session 17 at 4x2048: +wh keep13 -11 ms against keep6); cuDNN's
#    ragged layout -10 to -25 ms against keep6 if the probe puts it 0.3-0.8 ms a layer under flash, or an error.
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 100 gpu_tests_s26a.log tests/models/test_packing.py tests/test_bench_replay.py
timeout 150 python3 bench/gpu/probe_packed_attention.py --out "$OUT/packed_attention_s26a.json" 2>&1 | tail -26
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --packed --batch 1 --seq 8192"
V="all+once+stash+host+lastdev+headhost"
run_ours var_packed_s26a 260 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep6+graph,$V+wh+keep10+graph,$V+wh+keep13+graph,$V+keep6+graph,$V+keep6+graph+cudnnpacked,$V+keep6+graph+cudnnpackedrep"
show_variants s26a packed
echo "== done $(date +%T)"
