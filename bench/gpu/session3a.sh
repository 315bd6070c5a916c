#!/usr/bin/env bash
# Device call 1 of session 3 (~580 s): 70B shapes at 4096 under the 80 GiB cap (full 80 layers), the check of the
# reduced-depth stand-in used by the max-context searches, kernel benches with the launch-hidden timing, then the
# GPU-marked kernel and model tests with whatever time is left. Phases in priority order, each with its own limit.
set -o pipefail
source bench/gpu/_env.sh
t0=$(date +%s); left() { echo $(( ${1} - $(date +%s) + t0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== 70b at 4096 $(date +%T)"
timeout 200 python3 bench/e2e/max_context.py --targets run_70b_4096 --budget-s 190 --out /tmp/bigmodel.json 2>&1 \
  | grep -E "max_context|run_70b|summary|Error|error" | tail -15
cp /tmp/bigmodel.json "$OUT/bigmodel_s3.json" 2>/dev/null
echo "== ballast check $(date +%T)"
timeout 100 python3 bench/e2e/check_ballast.py --synthetic 70b --deep 3 --seq 16384 --timeout-s 45 2>&1 | tail -4
cp bench/results/ballast_check_*.json "$OUT/" 2>/dev/null
echo "== kernel benches $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout $(( $(left 470) > 60 ? $(left 470) : 60 )) python3 bench/kernels/run_all.py \
  --only rms_norm rope swiglu fused_linear_cross_entropy --reps 30 --out /tmp/kernels_s3.json 2>&1 | grep -v Warning | tail -75
cp /tmp/kernels_s3.json "$OUT/kernels_s3.json" 2>/dev/null
echo "== gpu tests $(date +%T)"
timeout $(( $(left 585) > 30 ? $(left 585) : 30 )) python3 -m pytest -q -m gpu tests/kernels tests/models -p no:cacheprovider \
  --timeout=200 2>&1 | grep -E "passed|failed|FAILED|Error|PASSED" | tail -30 | tee "$OUT/gpu_tests_s3.log"
echo "== done $(date +%T)"
