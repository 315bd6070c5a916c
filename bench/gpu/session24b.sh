#!/usr/bin/env bash
# Prepared in session 23, not yet run (~500 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh): one more 1x65536 same-call ratio at the row-span LoRA SwiGLU kernels (session 23: 1.2968x and
# 1.3083x on two machines), the LoRA SwiGLU sweep at 65,536 rows first with spans past 32 (~40 s) and lora_pair's
# launch settings at 65,536 rows (~60 s; session 21's profile: 92 ms a 64k step, ~0.65 of copy by its bytes).
# Prediction: the SwiGLU sweep's best within 2% of 16:128:4:3:32; a lora_pair setting 10-25% faster than (32, 256, 4,
# 3) at K = 14,336; the e2e 1.297-1.310x.
set -o pipefail
source bench/gpu/_env.sh
timeout 90 python3 bench/kernels/sweep_lora_swiglu.py --rows 65536 --out "$OUT/lora_swiglu_sweep_s24b_65536.json" \
  --settings 16:128:4:3:32,16:128:4:3:64,16:128:4:4:32,16:128:4:2:32,16:128:4:4:64 2>&1 | tail -4
timeout 120 python3 bench/kernels/sweep_lora_pair.py --rows 65536 --out "$OUT/lora_pair_sweep_s24b_65536.json" 2>&1 \
  | tail -3
run_e2e e2e_s24b_64k 440 1x65536 "--stash-attention --dequantize-once --last-layer-on-device 2 --keep-mlp-layers 2 \
--keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
