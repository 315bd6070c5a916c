#!/usr/bin/env bash
# Prepared in session 13, not run (~420 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim). What session 13 could
# not measure for want of device time: the last layer's input and stash kept on the device
# (models.settings.set_last_layer_on_device, off by default: +lastdev), alternated at 4x2048 as a CUDA graph and at
# 1x16384 eager, with one more kept MLP layer where its memory allows; the LoRA SwiGLU forward writing H alone (what
# a checkpointed layer's forward now asks for: kernels.lora_swiglu store_gu); the step profiled with session 13's
# code; the losses of ours (session 13's e2e settings) against standard QLoRA in one call.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/models/test_memory_settings.py tests/kernels/test_rms_norm.py \
  tests/models/test_attention_stash.py tests/models/test_fused_residuals.py --timeout=110 -rf --tb=line 2>&1 \
  | grep -E "passed|failed|FAILED|Error|assert" | tail -8 | tee "$OUT/gpu_tests_s14a.log"
python3 bench/kernels/sweep_lora_swiglu.py --settings 16:128:2,16:128:4 --out "$OUT/lora_swiglu_h_only_s14a.json" 2>&1 \
  | grep -E "best" | tail -4
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host"
run_ours var_4x2048_s14a 200 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep4+graph,$V+keep4+lastdev+graph,$V+keep5+lastdev+graph,$V+keep4+graph,$V+keep4+lastdev+graph"
run_ours var_1x16384_s14a 130 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 \
  --variants "$V+keep3,$V+keep3+lastdev,$V+keep4+lastdev,$V+keep3"
run_ours prof_4x2048_s14a 100 $FLAGS --embeddings-on-host --keep-mlp-layers 4 --warmup 2 --steps 4 --profile
show_variants s14a 4x2048 1x16384
python3 -c "import json; d = json.load(open('$OUT/prof_4x2048_s14a.json')); print('profile', d.get('step_ms_median'), d.get('profile', {}).get('timeline', {}).get('busy_ms'))"
python3 bench/e2e/bench_e2e.py --budget-s "${BUDGET:-200}" --shapes 4x2048 --stacks ours,std_qlora --ckpt-ours offload \
  --ours-flags "--stash-attention --dequantize-once --embeddings-on-host --keep-mlp-layers 4 --cuda-graph" \
  --out "$OUT/e2e_s14a_losses.json" 2>&1 | grep -v "Failed to query" | tail -8
echo "== done $(date +%T)"
