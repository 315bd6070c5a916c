#!/usr/bin/env bash
# The fused kernels and bench/kernels/bench_lora_swiglu_grad.py it ran were removed after session 22 (slower than the
# unfused kernels; bench/NOTES.md): run it at a commit before their removal, e.g. 2490b21.
# Session 22, after session22a.sh: the fused SwiGLU kernels gave the unfused bits exactly on the GPU but ran 1.9x
# slower (65,536 rows, lean backward: 11.45 ms at 16:8 against 6.01 unfused; H-only forward 3.49 against 2.44).
# Their grid is lora_pair's (8 row spans x 56 column blocks = 448 programs at 65,536 rows), each walking 8,192 rows
# 16 at a time with nine small dots a step. Sweep: num_stages (software pipelining of the row loop) and lora_pair's
# span split 2^s times (8 x 2^s row blocks: more programs in flight; Q's partials grow to 8 x 2^s x I x r fp32).
# Prediction: latency-bound, so the split helps most; if no setting gets the lean backward under 6.0 ms the fused
# path stays opt-in.
set -o pipefail
source bench/gpu/_env.sh
echo "== sweep $(date +%T)"
timeout 420 python3 bench/kernels/bench_lora_swiglu_grad.py --rows 65536 16384 --reps 10 \
  --settings "16:8,16:8:1,16:8:2,16:8:4,16:8:1:3,16:8:3:3,16:8:3:5,32:8:1:3,32:4:1:3,16:4:1:3,64:8:1:3,32:8:3:3" \
  --out "$OUT/lora_swiglu_grad_sweep_s22d.json" 2>&1 | grep -vE '^\{' | tail -110
echo "== done $(date +%T)"
