#!/usr/bin/env bash
# Device call: all GPU-marked tests (no -x), kernel benches with Liger on the path, then more e2e pairs.
set -o pipefail
source bench/gpu/_env.sh
t0=$(date +%s)
echo "== gpu tests $(date +%T)"
timeout 240 python3 -m pytest -q -m gpu tests/kernels tests/models -p no:cacheprovider --timeout=120 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -30 | tee "$OUT/gpu_tests.log"
echo "== kernel benches with liger $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 150 python3 bench/kernels/run_all.py --only rms_norm rope swiglu fused_linear_cross_entropy 2>&1 | tail -5
cp bench/results/kernels_*.json "$OUT/" 2>/dev/null
left=$(( 570 - $(date +%s) + t0 ))
echo "== e2e continued, ${left}s $(date +%T)"
[ $left -gt 90 ] && BUDGET=$left bash bench/gpu/e2e_main.sh
echo "== done $(date +%T)"
