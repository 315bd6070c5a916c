#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~330 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# 1. Packed attention alone (bench/gpu/probe_packed_attention.py): flash varlen with kv repeated (ours to session 24)
#    and shared (ours since session 25), cuDNN's ragged layout through the aten ops (`models.attention._CudnnRagged`,
#    torch's varlen keeps it off) with kv repeated and shared, and causal cuDNN once per document, forward + backward
#    at 6, 11 and 32 documents in 8,192 tokens, and 6 with 10 empty ones after them (a CUDA graph's bounds).
#    Prediction: flash varlen repeated ~1.9 ms (DESIGN.md: 1.91 at 8 documents), shared 0.1-0.3 ms less; cuDNN's
#    ragged layout 1.0-1.5 ms or an error; per document 3-4 ms at 6 documents.
# 2. Ours on packed rows, one process, 6 timed steps a variant: session 14's packed flags (keep6), the 4x2048 settings
#    (weights on the host, 10 and 13 layers kept), then keep6 with cuDNN's ragged layout for attention, kv shared and
#    repeated (last: a kernel error may leave the context unusable). Prediction (session 17 at 4x2048: +wh keep13 -11
#    ms against keep6, peak 8.02 GiB): +wh -5 to -15 ms, +wh keep10 under Unsloth's 7.67 GiB; cuDNN's ragged layout
#    -10 to -25 ms against keep6 if the probe puts it 0.3-0.8 ms a layer under flash (32 layers, no recompute).
set -o pipefail
source bench/gpu/_env.sh
timeout 150 python3 bench/gpu/probe_packed_attention.py --out "$OUT/packed_attention_s26b.json" 2>&1 | tail -26
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --packed --batch 1 --seq 8192"
V="all+once+stash+host+lastdev+headhost"
run_ours var_packed_s26b 260 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep6+graph,$V+wh+keep10+graph,$V+wh+keep13+graph,$V+keep6+graph,$V+keep6+graph+cudnnpacked,$V+keep6+graph+cudnnpackedrep"
show_variants s26b packed
echo "== done $(date +%T)"
