#!/usr/bin/env bash
# Prepared in session 18, not run (~210 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). The 4x2048 e2e against Unsloth and standard QLoRA in one call, session 17's settings (1.308x,
# 61.4% MFU against that call's 738.1 TFLOP/s), now against the steadier matmul rate (session 18: 669-681 TFLOP/s):
# prediction ~66% MFU, the ratio 1.29-1.32 (session 17's 1.308 was one call). The same settings as session 17
# (its peak, 7.83 GiB, is 0.22 under Unsloth's: nothing untried here).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s19d 320 4x2048 "--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device \
--head-on-host --weights-on-host --keep-mlp-layers 13 --cuda-graph" ours,unsloth,std_qlora
echo "== done $(date +%T)"
