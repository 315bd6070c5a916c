#!/usr/bin/env bash
# Prepared in session 18, not run (~380 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# The GPU tests session 18's budget cut (test_host_weights.py: generate now asks for min_new_tokens) and those of
# keep_mlp_gate_on_host (test_memory_settings.py: the same gradients with each layer's gate alone on the host) and of
# offload_lag (test_offload_lag.py: the same bits at 1, 2 and 4).
# Then 1x65536, one process per variant (torch's pinned cache must not carry over), `free` sampled, from session
# 18's e2e settings (tables on the GPU, keep2 +hostkeep14: 11,110.4 ms in call 1; e2e 1.2985x and 1.297x):
# A: a second on-device layer (session 18: no GPU peak cost, +0.01 GiB at 1x65536), which frees 2.27 GiB of host
#    memory; prediction 0 to -15 ms (one layer's input and stash off the PCIe link each way);
# B: A and a 15th layer's gate output alone on the host (+1.75 GiB: 118.47 GiB by the count, 119.6 usable);
#    prediction -8 to -11 ms against A (one of two 7.7-TFLOP GEMMs off the recompute).
# session19c.sh runs the e2e with the faster (FLAGS_64K printed last).
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 100 gpu_tests_s19b.log tests/models/test_host_weights.py tests/models/test_memory_settings.py \
  tests/models/test_offload_lag.py
run_each var_1x65536_s19b 170 "--synthetic 8b --ckpt offload --stash-attention --dequantize-once --mlp-chunk-tokens 0 \
--batch 1 --seq 65536 --warmup 1 --steps 2" "all+once+stash+lastdev2+keep2+hostkeep14" \
  "all+once+stash+lastdev2+keep2+hostkeep14+hostgate1"
show_variants s19b_lastdev2_keep2_hostkeep14 1x65536
show_variants s19b_lastdev2_keep2_hostkeep14_hostgate1 1x65536
FLAGS_64K=$(python3 bench/gpu/best_variant.py "$OUT"/var_1x65536_s19b_*.json --max-peak-gib 22.64 \
  --extra "--mlp-chunk-tokens 0" --default "--stash-attention --dequantize-once --last-layer-on-device 2 \
--keep-mlp-layers 2 --keep-mlp-layers-on-host 14 --mlp-chunk-tokens 0")
echo "== FLAGS_64K=\"$FLAGS_64K\""
echo "== done $(date +%T)"
