#!/usr/bin/env bash
# Prepared in session 20, not run (~580 s; carry .whl/core: the whole suite collects the Ray tests too).
# Every GPU test (gpu and not slow) in one call: the whole suite last ran in session 3 (39 passed); session 20's try
# ran past 270 s and, with only the summary kept, left nothing (gpu_tests now keeps every test's line as it finishes).
set -o pipefail
source bench/gpu/_env.sh
# session 20's RoPE-less lean recompute (not gpu-marked: a kernel test, on CUDA where there is one): the same bits
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rope.py -k stashed_lean 2>&1 | tail -2 \
  | tee "$OUT/gpu_tests_s21b_rope.log"
gpu_tests 480 gpu_tests_s21b.log tests
echo "== done $(date +%T)"
