#!/usr/bin/env bash
# Device call 1 of session 4 (~450 s): recomputation settings timed on one loaded model each (run_stack --variants):
# 70B shapes at 4096 under the 80 GiB cap (issue 8's 1,400 tokens/s), then 8B shapes at 4x2048 and 1x2048
# (issue 5). Variants: checkpointed layers (all or a count) and +once (dequantize_once).
set -o pipefail
source bench/gpu/_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  echo "== $name $(date +%T)"
  timeout "$t" python3 bench/e2e/run_stack.py --stack ours --out "$OUT/$name.json" "$@" 2>&1 \
    | grep -E "variant|loaded|Error|error" | tail -20
}
run v70b_4096 260 --synthetic 70b --batch 1 --seq 4096 --ckpt on --mem-cap-gib 80 --warmup 1 --steps 3 \
  --variants ${V70:-all,all+once,68+once,60+once,52+once,44+once,36+once}
run v8b_4x2048 110 --synthetic 8b --batch 4 --seq 2048 --ckpt on --warmup 2 --steps 5 \
  --variants ${V8:-all,all+once,24+once,16+once,8+once,0}
run v8b_4x2048_offload 60 --synthetic 8b --batch 4 --seq 2048 --ckpt offload --warmup 2 --steps 5 \
  --variants all,all+once
run v8b_1x2048 60 --synthetic 8b --batch 1 --seq 2048 --ckpt on --warmup 2 --steps 5 --variants all,all+once,16+once,0
echo "== profile 4x2048 $(date +%T)"
timeout 70 python3 bench/e2e/run_stack.py --stack ours --synthetic 8b --batch 4 --seq 2048 --ckpt on --warmup 2 --steps 2 \
  --profile --out "$OUT/profile_8b_4x2048.json" 2>&1 | grep -E "profile|  [ 0-9.]+ ms" | head -34
echo "== done $(date +%T)"
