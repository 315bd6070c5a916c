#!/usr/bin/env bash
# Prepared in session 17, not run (~560 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE
# sourcing _env.sh). 1x16384: session 17's e2e ran +wh keep6 +hostkeep8 at 1,518.1 ms against Unsloth's 1,949.8
# (1.284x; 1.3x needs 1,499.8). Variants, one process: the input embedding back on the GPU (+0.98 GiB of 1.79 spare
# under Unsloth's 10.08: -2.7 ms of gather), one more kept layer (+0.88 GiB; keep7 bought nothing in call 4), and a
# CUDA graph (0.8% at 4x2048; never timed at 16,384 with these settings). Prediction: -3 to -12 ms. And the last
# 3 / 4 layers' inputs and stashes on the GPU (`last_layer_on_device: N`, 576 MiB a layer more), off the PCIe link
# whose forward copies bound the host-kept layers (session 16: +hostkeep 8 -> 12 cost 30 ms): -3 to -15 ms, with 1-2
# more host-kept layers. Then the e2e with the fastest at <= 10.0 GiB.
set -o pipefail
source bench/gpu/_env.sh
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
H="all+once+stash+host+headhost+wh"
D="all+once+stash+headhost+wh"
run_ours var_1x16384_s18c 330 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 --variants \
"$H+lastdev+keep6+hostkeep8,$D+lastdev+keep6+hostkeep8,$H+lastdev+keep6+hostkeep8+graph,$D+lastdev+keep7+hostkeep8+graph,\
$H+lastdev3+keep6+hostkeep8,$H+lastdev3+keep6+hostkeep9,$H+lastdev3+keep6+hostkeep10,$H+lastdev4+keep6+hostkeep10,\
$H+lastdev+keep6+hostkeep8"
show_variants s18c 1x16384
FLAGS_16K=$(python3 bench/gpu/best_variant.py "$OUT/var_1x16384_s18c.json" --max-peak-gib 10.0 \
  --default "--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host \
--weights-on-host --keep-mlp-layers 6 --keep-mlp-layers-on-host 8")
echo "== FLAGS_16K=\"$FLAGS_16K\""
run_e2e e2e_s18c_16k 220 1x16384 "$FLAGS_16K"
# Session 17: the e2e ran 0.3-0.6% slower than the variant of the same settings on the same machine (4x2048 573.0
# against 571.0 ms, 1x16384 1,518.1 against 1,508.6, 1x65536 11,168.7 against 11,138.6). The e2e loads the model
# folder bench_e2e built (/tmp/rtl_bench/llama31_8b_random), the variants build it with --synthetic: time the
# base variant on that folder, in this call, against its --synthetic figure above.
run_ours var_1x16384_s18c_folder 120 --model /tmp/rtl_bench/llama31_8b_random --ckpt offload --stash-attention \
  --dequantize-once --batch 1 --seq 16384 --warmup 2 --steps 4 --variants "$H+lastdev+keep6+hostkeep8"
show_variants s18c_folder 1x16384
echo "== done $(date +%T)"
