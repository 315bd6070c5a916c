#!/usr/bin/env bash
# Device call 4 of session 6 (~520 s), issues 3 and 5: the GPU-marked SwiGLU tests (call 3's kernel tests ran out of
# time after 32 of 33), then the end-to-end protocol (bench_e2e.py, every stack in its own process) on the headline
# shapes with this session's kernels, as far as a 400 s budget goes.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_swiglu.py --timeout=90 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -8 | tee "$OUT/gpu_tests_s6d.log"
echo "== e2e $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 400 --shapes 4x2048,1x2048,packed_8192 \
  --stacks ours,unsloth,std_qlora,liger --out /tmp/e2e_s6d.json 2>&1 | grep -v "Failed to query" | tail -40
cp /tmp/e2e_s6d.json "$OUT/e2e_s6d.json" 2>/dev/null
echo "== done $(date +%T)"
