#!/usr/bin/env bash
# Prepared in session 17, not run (~470 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# 1x65536, one process per variant in one call (torch's pinned cache must not carry over), `free` sampled:
# A: session 17's e2e settings, the tables on the host, +hostkeep13 (call 4: 11,138.6 ms, 117.56 GiB pinned);
# B: the input embedding and the LM head on the GPU (+1.96 GiB, under Unsloth's 22.64), +hostkeep14 (call 7 on
#    another machine: 11,317.6 ms, 119.06 GiB pinned; no base in that call).
# C: the tables on the host, the last 2 layers' inputs and stashes on the GPU (+2.27 GiB: 22.05, under 22.64), which
#    frees the host memory of a 14th host-kept layer (118.68 GiB by the count).
# Prediction: B -35 to -50 ms against A (the 65,536-row gather over PCIe, ~10.7 ms, and a 14th host-kept layer,
# 25-40 ms); C -25 to -40 (the layer alone). Then session18b.sh runs the e2e with the fastest (FLAGS_64K printed
# last). ~370 s.
set -o pipefail
source bench/gpu/_env.sh
# session 17's code on a GPU first: last_layer_on_device N (same bits, no copies), the weights on the host
gpu_tests 100 gpu_tests_s18a.log tests/models/test_memory_settings.py tests/models/test_host_weights.py
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --mlp-chunk-tokens 0"
for v in "all+once+stash+host+lastdev+headhost+keep2+hostkeep13" "all+once+stash+lastdev+keep2+hostkeep14" \
  "all+once+stash+host+lastdev2+headhost+keep2+hostkeep14"; do
  tag=$(echo "$v" | tr '+' '_' | sed 's/all_once_stash_//')
  ( while sleep 2; do free -m | awk '/Mem:/{print $3}'; done > "$OUT/free_$tag.log" ) & S=$!
  run_ours "var_1x65536_s18a_$tag" 170 $FLAGS --batch 1 --seq 65536 --warmup 1 --steps 2 --variants "$v"
  kill $S; echo "max used MiB: $(sort -n "$OUT/free_$tag.log" | tail -1)"
done
show_variants s18a_host_lastdev_headhost_keep2_hostkeep13 1x65536
show_variants s18a_lastdev_keep2_hostkeep14 1x65536
show_variants s18a_host_lastdev2_headhost_keep2_hostkeep14 1x65536
FLAGS_64K=$(python3 bench/gpu/best_variant.py "$OUT"/var_1x65536_s18a_*.json --max-peak-gib 22.64 \
  --extra "--mlp-chunk-tokens 0" --default "--stash-attention --dequantize-once --embeddings-on-host \
--last-layer-on-device --head-on-host --mlp-chunk-tokens 0 --keep-mlp-layers 2 --keep-mlp-layers-on-host 13")
echo "== FLAGS_64K=\"$FLAGS_64K\""
echo "== done $(date +%T)"
