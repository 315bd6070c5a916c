#!/usr/bin/env bash
# Prepared in session 15, not run (~530 s; carry .whl/slim and .ab, WHEELS=.whl/slim exported BEFORE sourcing _env.sh;
# first `rm -rf .ab && mkdir -p .ab/base && git archive a24c641 raytune_llm | tar -x -C .ab/base`).
# What session 15 built after its device time ran out, against a24c641 (the code of its last e2e, 1.288x Unsloth):
# - the down projection's rank-r update along K ([H | H A_d^T] @ [W_d | s B_d]^T; prediction: the 32 addmm_ passes over
#   the [N, hidden] output, ~1.4 ms a step at 4x2048 by session 14's profile) and lora_pair's swept tile (32, 256, 4)
#   (-0.8 ms by the sweep): the A/B below, alternated twice;
# - model.keep_mlp_layers_on_host: 4x2048 variants (prediction: +hostkeep1-2 -1.5 to -4 ms a step, more stall the
#   forward, whose copies fill 86% of it). session16b.sh has the 1x16384 variants and the e2e.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/models/test_memory_settings.py \
  tests/kernels/test_lora.py tests/kernels/test_lora_pair.py tests/kernels/test_nf4.py --timeout=110 -rf --tb=line 2>&1 \
  | grep -E "passed|failed|FAILED|Error|assert" | tail -8 | tee "$OUT/gpu_tests_s16a.log"
timeout 60 python3 bench/kernels/bench_lora_epilogues.py --out "$OUT/lora_pair_s16a.json" 2>&1 | grep pair | tail -15
OURS="--synthetic 8b --batch 4 --seq 2048 --ckpt offload --stash-attention --dequantize-once --embeddings-on-host
  --last-layer-on-device --head-on-host --keep-mlp-layers 6 --cuda-graph"
for i in 1 2; do
  for v in base new; do
    root=$PWD; [ "$v" = base ] && root=$PWD/.ab/base
    echo "== ab $v $i $(date +%T)"
    PYTHONPATH=/tmp/site:$root timeout 80 python3 bench/e2e/run_stack.py --stack ours --out "/tmp/ab_${v}_$i.json" \
      $OURS 2>&1 | grep -E "tokens/s|Error|error" | tail -2
  done
done
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev+headhost"
run_ours var_4x2048_s16a 200 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep6+graph,$V+keep6+hostkeep1+graph,$V+keep6+hostkeep2+graph,$V+keep6+hostkeep4+graph,$V+keep6+graph"
show_variants s16a 4x2048
echo "== done $(date +%T)"
