#!/usr/bin/env bash
# Prepared in session 16, not run (~560 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). Long rows. 1x16384: the weights on the host fund three more kept layers (896 MiB each, ~4.9 ms
# of gate/up GEMMs each) beside session 16's +hostkeep8 (1,538.7 ms against 1,554.1); 1.3x Unsloth's session-14
# 8,341 tokens/s needs ~1,511 ms. Then the 1x16384 e2e against Unsloth with KEEP_16K / HOSTKEEP_16K (defaults: 7, 8).
# The 1x65536 e2e (session 16: 1.292x with +hostkeep12, the host's memory the limit) is session17d.sh.
set -o pipefail
source bench/gpu/_env.sh
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev+headhost"
run_ours var_1x16384_s17c 200 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 \
  --variants "$V+keep4+hostkeep8,$V+wh+keep4+hostkeep8,$V+wh+keep7+hostkeep8,$V+wh+keep7+hostkeep6,$V+keep4+hostkeep8"
show_variants s17c 1x16384
OURS="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host --weights-on-host"
run_e2e e2e_s17c_16k 300 1x16384 "$OURS --keep-mlp-layers ${KEEP_16K:-7} --keep-mlp-layers-on-host ${HOSTKEEP_16K:-8}"
echo "== done $(date +%T)"
