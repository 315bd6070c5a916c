#!/usr/bin/env bash
# Prepared in session 18, not run (~470 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). 1x16384: session 18's e2e ran +wh keep6 +hostkeep8 at 1,512.2 ms against Unsloth's 1,953.2
# (1.291x; 1.3x needs 1,502.5). Session 18 measured that a second on-device layer (`last_layer_on_device: 2`) adds
# nothing to the peak (1x65536: +0.01 GiB), a third +0.69 GiB and a fourth +1.26 at 16,384 (one kept layer +0.87):
# the variants spend the 1.79 GiB left under Unsloth's 10.08 on those. One process, the base first and last
# (session 18: the same variant 1,514.1 first and 1,502.8 last). Predicted peaks: lastdev2 8.29, lastdev2+keep7 9.16,
# lastdev3+keep7 9.85, lastdev4 9.54, lastdev3+hostkeep7 8.98. Prediction: lastdev2 -3 to -10 ms (576 MiB off the
# PCIe link each way, which the forward's copies fill), keep7 -3 to -5 more. And `offload_lag: 3` (a layer's forward
# waits for the copies of the layer 3 back, not 2; +0.56 GiB during the forward), which lets a host-kept layer's
# 1.5 GiB burst of copies run under two layers' compute: 0 to -15 ms at +hostkeep8, and +hostkeep9 no longer ~33 ms
# worse. Then the e2e with the fastest <= 10.0.
set -o pipefail
source bench/gpu/_env.sh
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
H="all+once+stash+host+headhost+wh"
run_ours var_1x16384_s19a 340 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 --variants \
"$H+lastdev+keep6+hostkeep8,$H+lastdev2+keep6+hostkeep8,$H+lastdev2+keep7+hostkeep8,$H+lastdev3+keep7+hostkeep8,\
$H+lastdev4+keep6+hostkeep8,$H+lastdev3+keep6+hostkeep7,$H+lastdev2+keep6+hostkeep8+lag3,$H+lastdev2+keep6+hostkeep9+lag3,\
$H+lastdev+keep6+hostkeep8"
show_variants s19a 1x16384
FLAGS_16K=$(python3 bench/gpu/best_variant.py "$OUT/var_1x16384_s19a.json" --max-peak-gib 10.0 \
  --default "--stash-attention --dequantize-once --embeddings-on-host --head-on-host --weights-on-host \
--last-layer-on-device 2 --keep-mlp-layers 6 --keep-mlp-layers-on-host 8")
echo "== FLAGS_16K=\"$FLAGS_16K\""
run_e2e e2e_s19a_16k 220 1x16384 "$FLAGS_16K"
echo "== done $(date +%T)"
