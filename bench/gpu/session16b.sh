#!/usr/bin/env bash
# Prepared in session 15, not run (~400 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing
# _env.sh). model.keep_mlp_layers_on_host at 1x16384 (prediction: 896 MiB a layer, 2 x 2.6 ms of GEMMs saved each,
# the forward's copies ~65% busy there: +hostkeep4-8 -20 to -40 ms a step, the 35 ms 1x16384 lacks), then the e2e
# at 1x16384 against Unsloth in the same call (HOSTKEEP_16K: the best variant's count, set after reading them;
# default none). The 4x2048 e2e: session16c.sh.
set -o pipefail
source bench/gpu/_env.sh
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev+headhost"
run_ours var_1x16384_s16b 170 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 \
  --variants "$V+keep4,$V+keep4+hostkeep4,$V+keep4+hostkeep8,$V+keep4+hostkeep12,$V+keep4"
show_variants s16b 1x16384
OURS="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host"
run_e2e e2e_s16b_16k 210 1x16384 "$OURS --keep-mlp-layers 4 --keep-mlp-layers-on-host ${HOSTKEEP_16K:-0}"
echo "== done $(date +%T)"
