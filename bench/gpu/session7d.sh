#!/usr/bin/env bash
# Device call 4 of session 7 (~440 s), issue 5: the stash fix on the GPU (the fp32 lean-Q/K/V test that failed in
# call 3), where 1x2048's time goes among the checkpointing settings (call 3's e2e had ours at 0.78x Unsloth there),
# then packed 8192 and 1x16384 for ours and Unsloth, resumed into call 3's e2e file.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py -k "lean" tests/models/test_attention_stash.py \
  --timeout=50 -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6 | tee "$OUT/gpu_tests_s7d.log"
echo "== v8b_1x2048 $(date +%T)"
timeout 80 python3 bench/e2e/run_stack.py --stack ours --out "$OUT/v8b_1x2048_s7.json" --synthetic 8b --batch 1 --seq 2048 \
  --ckpt on --warmup 2 --steps 8 --variants all+on,all+on+once,all+offload,all+offload+stash,all+offload+once+stash 2>&1 \
  | grep -E "variant|Error|error" | tail -8
echo "== e2e $(date +%T)"
cp bench/results/e2e_h200_20261129_s7.json /tmp/e2e_s7d.json
python3 bench/e2e/bench_e2e.py --budget-s 300 --resume-from /tmp/e2e_s7d.json --shapes packed_8192,1x16384 \
  --stacks ours,unsloth --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once" --out /tmp/e2e_s7d.json 2>&1 \
  | grep -v "Failed to query" | tail -24
cp /tmp/e2e_s7d.json "$OUT/e2e_s7d.json" 2>/dev/null
echo "== done $(date +%T)"
