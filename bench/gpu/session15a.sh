#!/usr/bin/env bash
# Prepared in session 14, not run (~560 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing
# _env.sh). What session 14 could not check for want of device time: the GPU tests whose step ran past its limit in call
# 7 (the LoRA kernels; the head-on-host model test after the review's mends, with the memory settings), then 1x65536
# for ours (head on host, last layer on device, 2 kept MLP layers, MLP not split) and Unsloth in one call. Session 12's
# ours at 1x65536 ran 20.80 GiB against Unsloth's 22.64: the head's 0.92 GiB would not fund a third kept layer (3.76
# GiB at 65,536 tokens), so this measures the new code, not a new setting.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels/test_lora.py \
  tests/models/test_head_on_host.py tests/models/test_memory_settings.py --timeout=160 -rf --tb=line 2>&1 \
  | grep -E "passed|failed|FAILED|Error|assert" | tail -10 | tee "$OUT/gpu_tests_s15a.log"
run_e2e e2e_s15a "${BUDGET:-370}" 1x65536 \
  "--stash-attention --dequantize-once --mlp-chunk-tokens 0 --embeddings-on-host --last-layer-on-device --head-on-host --keep-mlp-layers 2"
echo "== done $(date +%T)"
