#!/usr/bin/env bash
# Prepared in session 15, not run (~540 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# model.keep_mlp_layers_on_host (session 15, CPU-tested only): more layers keep their MLP's gate and up outputs in
# pinned host memory. Session 15's analysis of session 14's profile: the forward's copies fill 86% of it at 4x2048,
# so each such layer adds ~8 ms of copies to a queue with ~0.9 ms spare a layer (plus ~20 ms in the loss); at 16,384
# tokens the forward has more spare (longer attention per layer). Prediction: 4x2048 +hostkeep1-2 -1.5 to -4 ms a
# step, more layers stall the forward; 1x16384 +hostkeep4-8 -20 to -40 ms. Also lora_pair's swept tile (32, 256, 4)
# in a step for the first time (the e2e of session 15 ran (64, 256, 8)), and its sweep with column blocks of 512.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/models/test_memory_settings.py \
  tests/kernels/test_lora.py tests/kernels/test_lora_pair.py --timeout=110 -rf --tb=line 2>&1 \
  | grep -E "passed|failed|FAILED|Error|assert" | tail -8 | tee "$OUT/gpu_tests_s16a.log"
timeout 60 python3 bench/kernels/bench_lora_epilogues.py --out "$OUT/lora_pair_s16a.json" 2>&1 | grep pair | tail -15
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev+headhost"
run_ours var_4x2048_s16a 220 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep6+graph,$V+keep6+hostkeep1+graph,$V+keep6+hostkeep2+graph,$V+keep6+hostkeep4+graph,$V+keep6+graph"
run_ours var_1x16384_s16a 170 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 \
  --variants "$V+keep4,$V+keep4+hostkeep4,$V+keep4+hostkeep8,$V+keep4+hostkeep12,$V+keep4"
show_variants s16a 4x2048 1x16384
echo "== done $(date +%T)"
