#!/usr/bin/env bash
# Device call 3 of session 6 (~550 s), issue 3: every kernel's bench in one call (run_all.py) on the session's final
# kernels (NF4 pair stores, fused CE with Liger's chunks and a W-dtype dL/dW, RoPE loads first), then the GPU-marked
# kernel tests.
set -o pipefail
source bench/gpu/_env.sh
echo "== kernel bench, all $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 360 python3 bench/kernels/run_all.py --reps 30 \
  --out /tmp/kernels_s6c.json 2>&1 | grep -vE "Warning|warn|Configuration class" | tail -60
cp /tmp/kernels_s6c.json "$OUT/kernels_s6c.json" 2>/dev/null
echo "== gpu tests $(date +%T)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels --timeout=190 -rf --durations=8 2>&1 \
  | grep -vE "Warnings|warnings.warn|DeprecationWarning" | tail -20 | tee "$OUT/gpu_tests_s6c.log"
echo "== done $(date +%T)"
