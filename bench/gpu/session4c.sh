#!/usr/bin/env bash
# Device call 3 of session 4 (~400 s): issue 5's long rows with recomputation variants on one loaded 8B-shaped model
# each (1x65536 with offload: MLP split or not, dequantize_once; 1x16384 with on and offload), then the RMSNorm
# backward launch-settings sweep beside Liger (issue 3).
set -o pipefail
source bench/gpu/_env.sh
run() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  echo "== $name $(date +%T)"
  timeout "$t" python3 bench/e2e/run_stack.py --stack ours --out "$OUT/$name.json" "$@" 2>&1 \
    | grep -E "variant|loaded|Error|error" | tail -20
}
run v8b_1x65536_offload 190 --synthetic 8b --batch 1 --seq 65536 --ckpt offload --warmup 1 --steps 1 \
  --variants ${V65:-all+chunk0,all+once+chunk0,all,28+once+chunk0}
run v8b_1x16384_offload 70 --synthetic 8b --batch 1 --seq 16384 --ckpt offload --warmup 1 --steps 3 \
  --variants all,all+once,all+once+chunk0,28+once
run v8b_1x16384_on 60 --synthetic 8b --batch 1 --seq 16384 --ckpt on --warmup 1 --steps 3 --variants all,all+once
echo "== rms_norm backward sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 150 python3 bench/kernels/sweep_rms_norm_bwd.py \
  --out "$OUT/rms_norm_bwd_sweep.json" 2>&1 | grep -vE "Warning|warn" | tail -30
echo "== done $(date +%T)"
