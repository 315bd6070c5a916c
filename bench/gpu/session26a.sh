#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~430 s on a fresh machine; carry .whl/slim, WHEELS=.whl/slim exported
# BEFORE sourcing _env.sh). Packed rows, ours alone; session26b.sh times ours' packed variants, 26c the e2e.
# 1. The GPU tests of the packed kernels (flash varlen with kv shared since session 25, cuDNN's ragged layout with kv
#    shared and repeated; each against the dense mask, forward and gradients, bounds read on the host and found on
#    the GPU as a capture does), of the captured step (packed rows over the recorded documents or longest document
#    run eagerly; since session 25 attention is told the longest bound, not the row length) and of the replay
#    warm-up (`run_stack --replay-warmup` with a recorded step).
# 2. Packed attention alone (bench/gpu/probe_packed_attention.py): flash varlen with kv repeated (ours to session 24)
#    and shared, cuDNN's ragged layout (`models.attention._CudnnRagged`) with kv repeated and shared, compiled
#    FlexAttention with a document-causal block mask, and causal cuDNN once per document, forward + backward at 6,
#    11 and 32 documents in 8,192 tokens, and 6 with 10 empty ones after them (a CUDA graph's bounds) told the row
#    length (to session 24) and 4,096 (2x the warm-up's longest, since session 25) as the longest. Prediction:
#    flash varlen repeated ~1.9 ms (DESIGN.md: 1.91 at 8 documents), shared 0.1-0.3 ms less; cuDNN's ragged layout
#    1.0-1.5 ms or an error; FlexAttention ~1.4 ms (DESIGN.md: 1.45 at 8 documents) with a mask build of 0.1-0.5 ms;
#    per document 3-4 ms at 6 documents; the empty documents' blocks (grid 16 x 64 x 32 against 7 x 15 x 32) cost
#    flash 0.1-0.6 ms more forward + backward at 8,192 than without them, half that at 4,096.
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 200 gpu_tests_s26a.log tests/models/test_packing.py tests/models/test_graphs.py tests/test_bench_replay.py
timeout 220 python3 bench/gpu/probe_packed_attention.py --out "$OUT/packed_attention_s26a.json" 2>&1 | tail -40
echo "== done $(date +%T)"
