#!/usr/bin/env bash
# Prepared in session 16, not run (~560 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# 1. The GPU tests of session 16's code: host copies in power-of-two pinned pieces, model.weights_on_host (same bits,
#    the weights off the device, a recorded step), the kept-layer tests.
# 2. model.weights_on_host at 4x2048 (prediction: the NF4 weights leave the device, peak 7.82 -> ~4.7 GiB; the step
#    +0 to +4 ms, a layer's 105 MiB host-to-device in each forward, where that direction is idle, and in each
#    backward beside the checkpoints coming back), then the freed memory spent on kept MLP layers, 448 MiB each
#    (sessions 12-14: 2.3-5.4 ms a step each): keep10 / keep13 -10 to -35 ms against keep6, at <= 8.05 GiB (Unsloth).
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/models/test_host_weights.py \
  tests/models/test_attention_stash.py tests/models/test_memory_settings.py tests/models/test_graphs.py \
  --timeout=190 -rf --tb=line > /tmp/gpu_tests.log 2>&1
grep -E "passed|failed|FAILED|Error|assert" /tmp/gpu_tests.log | tail -12 | tee "$OUT/gpu_tests_s17a.log"
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev+headhost"
run_ours var_4x2048_s17a 300 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep6+graph,$V+wh+keep6+graph,$V+wh+keep10+graph,$V+wh+keep13+graph,$V+wh+keep14+graph,$V+keep6+graph"
show_variants s17a 4x2048
echo "== done $(date +%T)"
