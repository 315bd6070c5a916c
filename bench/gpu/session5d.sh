#!/usr/bin/env bash
# Device call 4 of session 5 (~250 s), issues 3 and 5: the NF4 dequantization kernel with one scale per quantization
# block (was: four loads per element): its GPU tests and the LoRA ones that dequantize through it, the launch-
# settings sweep beside bitsandbytes, then the 8B-shaped 4x2048 step that spends ~4% of its time there.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_nf4.py tests/kernels/test_lora.py --timeout=120 \
  2>&1 | grep -E "passed|failed|FAILED|Error" | tail -12 | tee "$OUT/gpu_tests_s5d.log"
echo "== nf4 sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 120 python3 bench/kernels/sweep_nf4.py --out "$OUT/nf4_sweep.json" \
  2>&1 | grep -vE "Warning|warn|Configuration class" | tail -24
echo "== 8b 4x2048 $(date +%T)"
timeout 100 python3 bench/e2e/run_stack.py --stack ours --out "$OUT/v8b_4x2048_nf4.json" \
  --synthetic 8b --batch 4 --seq 2048 --ckpt on --warmup 2 --steps 5 --variants all,all+once 2>&1 \
  | grep -E "variant|loaded|Error|error" | tail -8
echo "== done $(date +%T)"
