#!/usr/bin/env bash
# The fused kernels and bench/kernels/bench_lora_swiglu_grad.py it ran were removed after session 22 (slower than the
# unfused kernels; bench/NOTES.md): run it at a commit before their removal, e.g. 2490b21.
# Prepared in session 21, ran as session 22's call 1 (77 s; results in bench/NOTES.md; carry .whl/slim, WHEELS=.whl/slim
# exported BEFORE sourcing _env.sh).
# The fused LoRA SwiGLU kernels (kernels/lora_swiglu_grad.py; CPU-tested under the interpreter, compiled for sm_90
# without a GPU: 48 B of spills a thread at most at the default 16 rows x 256 columns x 8 warps):
# 1. their GPU tests (gpu-marked, 4,096 x 14,336, rank 16): fused against unfused within a bf16 unit of the last
#    place (each test prints how many elements differ: the rank updates run as warpgroup MMAs there, mma.sync here),
#    and the property training needs, exactly: a lean recompute's backward gives a kept layer's and a gate-kept
#    one's bits, its H A_d^T the forward's. A failure of the second breaks the whole-model same-bits tests too;
# 2. fused (BN:warps) against unfused at 65,536, 16,384 and 8,192 rows, both directions, exactness and peak memory.
# Predictions: the tests pass, some elements differing by a last bit. At 65,536 rows the unfused lean backward
# ~6.5-7 ms (4.36 the kernel + ~2.5 the three lora_pair reads), fused 3.8-4.6 ms at its best setting (9.4 GB + 0.7 GB of partials at 0.55-0.65 of copy):
# -2 to -3 ms a layer; the H-only forward 2.4-2.8 ms unfused (1.98 + H A_d^T's read of H), fused 2.0-2.4. At 1x65536
# -70 to -110 ms a step; peak memory +0.47 GiB in a lean layer's backward (two more 235 MB partial buffers).
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"  # -s: each test's count of differing elements
timeout 200 python3 -m pytest -v -s -p no:cacheprovider -m gpu tests/kernels/test_lora_swiglu_grad.py 2>&1 \
  | tee "$OUT/gpu_tests_s22a.log" | grep -E "differ|passed|failed|FAILED|Error" | tail -40
echo "== bench $(date +%T)"
timeout 300 python3 bench/kernels/bench_lora_swiglu_grad.py --rows 65536 16384 8192 \
  --out "$OUT/lora_swiglu_grad_s22a.json" 2>&1 | grep -vE '^\{' | tail -60
echo "== done $(date +%T)"
