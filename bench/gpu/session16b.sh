#!/usr/bin/env bash
# Session 16, call 2 (~570 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh). Call 1
# (session16a.sh) found +hostkeep1/2/4 slower at 4x2048 (588.3 -> 590.8 / 596.7 / 608.8 ms: the forward's copies are
# ~86% busy there). Here: the GPU tests call 1's 120 s cut off (only the gpu-marked ones now), then
# model.keep_mlp_layers_on_host where the forward's copies have room: 1x16384 (prediction: 896 MiB a layer, ~4.9 ms of
# gate/up GEMMs saved each, copies ~65% busy; -20 to -35 ms at hostkeep 8) and 1x65536 (3.5 GiB a layer, ~20 ms saved
# each, copies ~30% busy; host memory caps the count: ~58 GiB of inputs and stash already pinned). The e2e: 16c.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/models/test_memory_settings.py \
  tests/kernels/test_lora.py tests/kernels/test_lora_pair.py tests/kernels/test_nf4.py tests/models/test_fused_residuals.py \
  --timeout=160 -rf --tb=line > /tmp/gpu_tests.log 2>&1
grep -E "passed|failed|FAILED|Error|assert" /tmp/gpu_tests.log | tail -12 | tee "$OUT/gpu_tests_s16b.log"
tail -3 /tmp/gpu_tests.log
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev+headhost"
run_ours var_1x16384_s16b 190 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 \
  --variants "$V+keep4,$V+keep4+hostkeep4,$V+keep4+hostkeep8,$V+keep4+hostkeep12,$V+keep3+hostkeep12,$V+keep4"
show_variants s16b 1x16384
run_ours var_1x65536_s16b 200 $FLAGS --batch 1 --seq 65536 --mlp-chunk-tokens 0 --warmup 1 --steps 2 \
  --variants "$V+keep2,$V+keep2+hostkeep4,$V+keep2+hostkeep8"
show_variants s16b 1x65536
free -g | head -2
echo "== done $(date +%T)"
