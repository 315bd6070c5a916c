#!/usr/bin/env bash
# Device call 6 of session 5 (~200 s), issues 3 and 5: the NF4 sweep over more elements per thread (defaults now
# 2048 x 4 warps with the nibble shift), the NF4 GPU tests under the new defaults, and the 8B 4x2048 step.
set -o pipefail
source bench/gpu/_env.sh
echo "== nf4 sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 150 python3 bench/kernels/sweep_nf4.py --settings \
  2048:4:1,2048:2:1,4096:4:1,8192:4:1,4096:2:1,8192:8:1 --out "$OUT/nf4_sweep3.json" 2>&1 \
  | grep -vE "Warning|warn|Configuration class" | tail -24
echo "== gpu tests $(date +%T)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_nf4.py --timeout=60 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -6 | tee "$OUT/gpu_tests_s5f.log"
echo "== 8b 4x2048 $(date +%T)"
timeout 100 python3 bench/e2e/run_stack.py --stack ours --out "$OUT/v8b_4x2048_nf4b.json" \
  --synthetic 8b --batch 4 --seq 2048 --ckpt on --warmup 2 --steps 5 --variants all,all+once 2>&1 \
  | grep -E "variant|loaded|Error|error" | tail -8
echo "== done $(date +%T)"
