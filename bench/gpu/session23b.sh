#!/usr/bin/env bash
# Needs commit 2672fa6: bench/kernels/sweep_swiglu_persist.py was removed once the library kernels became row-span programs.
# Session 23 call 2 (~120 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh): persistent LoRA
# SwiGLU kernels (one column block a program, its adapter tiles loaded once, a span of rows walked) against the library's
# one-tile programs at 65,536 x 14,336, and what a K-extended gate/up GEMM costs (K = 4,096 + 0/16/32/64/128).
# Session 23 call 1 saw the K = 4,128 GEMMs cost ~0.9 ms more each (9%) inside the MLP. Prediction: the persistent
# kernels no faster (255 registers and spills compiled for sm_90 here, against 128-242 for the library's); the GEMM
# at K = 4,160 within 2% of K = 4,096 and K = 4,112/4,128 slower than 4,160.
set -o pipefail
source bench/gpu/_env.sh
timeout 400 python3 bench/kernels/sweep_swiglu_persist.py --out "$OUT/swiglu_persist_s23b.json" 2>&1 | tail -60
echo "== done $(date +%T)"
