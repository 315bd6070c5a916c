#!/usr/bin/env bash
# Device call 1 of session 7 (~420 s), issue 5: GPU tests of the lean recompute and the offload prefetch, the
# recompute variants at 4x2048 and 1x16384 on one loaded 8B-shaped model each (on / offload x full / lean, +once),
# a profile of the 4x2048 step as it now runs, and what attention's autograd nodes save and cost at each shape
# (probe_attention.py: is skipping attention in the recompute worth it).
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_checkpointing.py --timeout=120 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -8 | tee "$OUT/gpu_tests_s7a.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py -k "lean or dequantize_once" \
  --timeout=100 -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -8 | tee -a "$OUT/gpu_tests_s7a.log"
run_ours v8b_4x2048 150 --synthetic 8b --batch 4 --seq 2048 --ckpt on --warmup 2 --steps 6 \
  --variants all+on+full,all+on,all+offload+full,all+offload,all+offload+once,all+on+once,all+offload+full+once
run_ours v8b_1x16384 110 --synthetic 8b --batch 1 --seq 16384 --ckpt offload --warmup 1 --steps 3 \
  --variants all+full,all,all+once,all+on
run_ours prof8b_4x2048 90 --synthetic 8b --batch 4 --seq 2048 --ckpt offload --warmup 2 --steps 2 --profile
echo "== attention probe $(date +%T)"
timeout 60 python3 bench/gpu/probe_attention.py --out "$OUT/attention_probe.json" 2>&1 | tail -6 | cut -c1-1500
echo "== done $(date +%T)"
