#!/usr/bin/env bash
# Device call 3 of session 5 (~330 s), issue 3: every kernel's bench in one call (run_all.py, all benches) after the
# session's SwiGLU / RoPE / fused-CE changes, for the day's kernels JSON and its summary.
set -o pipefail
source bench/gpu/_env.sh
echo "== kernel bench, all $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 520 python3 bench/kernels/run_all.py --reps 30 \
  --out /tmp/kernels_s5c.json 2>&1 | grep -vE "Warning|warn|Configuration class" | tail -60
cp /tmp/kernels_s5c.json "$OUT/kernels_s5c.json" 2>/dev/null
echo "== done $(date +%T)"
