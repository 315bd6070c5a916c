#!/usr/bin/env bash
# Prepared in session 16, not run (~560 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). 1x65536: session 16's e2e ran 11,262 ms (+hostkeep12) against Unsloth's 14,554 (1.292x); 1.3x
# needs 11,196. Host copies now go into power-of-two pieces (12 layers' gate and up outputs 42 GiB instead of 48), so
# +hostkeep13 fits the 125 GiB host by sharding.host_memory's count (117.4 of 120 GiB usable; +hostkeep14, 120.9, is
# refused in one line). Prediction: -25 to -40 ms a host-kept layer, as 8 -> 12 gave. Then the e2e with the fastest.
set -o pipefail
source bench/gpu/_env.sh
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --mlp-chunk-tokens 0"
V="all+once+stash+host+lastdev+headhost"
run_ours var_1x65536_s17d 170 $FLAGS --batch 1 --seq 65536 --warmup 1 --steps 2 \
  --variants "$V+keep2+hostkeep13,$V+keep2+hostkeep14"
show_variants s17d 1x65536
HK=$(best_count "$OUT/var_1x65536_s17d.json" hostkeep 11262.1 12)  # session 16's e2e: +hostkeep12, 11,262 ms
echo "== chosen: --keep-mlp-layers-on-host $HK"
run_e2e e2e_s17d_64k 370 1x65536 "--stash-attention --dequantize-once --mlp-chunk-tokens 0 --embeddings-on-host \
  --last-layer-on-device --head-on-host --keep-mlp-layers 2 --keep-mlp-layers-on-host $HK"
echo "== done $(date +%T)"
