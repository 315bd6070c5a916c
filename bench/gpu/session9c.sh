#!/usr/bin/env bash
# Session 9, call 3 (~450 s), issue 3: every kernel's bench in one call (run_all.py) after the fused CE's backward
# stopped scaling dL/dW unconditionally (session 6: our backward 1.78 ms against Liger's 0.79, the whole 0.993x) and
# its first chunk's dL/dW is written instead of zeroed and added; then the fused CE's GPU tests.
set -o pipefail
source bench/gpu/_env.sh
echo "== kernel bench, all $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 380 python3 bench/kernels/run_all.py --reps 30 \
  --out "$OUT/kernels_s9c.json" 2>&1 | grep -vE "Warning|warn|Configuration class" | tail -45
echo "== gpu tests $(date +%T)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_cross_entropy.py --timeout=110 -rf \
  2>&1 | grep -vE "Warnings|warnings.warn|DeprecationWarning" | tail -8 | tee "$OUT/gpu_tests_s9c.log"
echo "== done $(date +%T)"
