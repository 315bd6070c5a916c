#!/usr/bin/env bash
# Session 15, call 3 (~560 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# 1. The model's fused-residual GPU test after its tolerance was set from call 2's figures.
# 2. bench_lora_epilogues: each of this session's three LoRA-op changes against the form it replaced (call 2's A/B of
#    the whole step moved 567.5 -> 567.1 ms, within its spread).
# 3. What is live at the peak of an eager 4x2048 step with 7 kept MLP layers (the e2e runs 6 under Unsloth's peak).
# 4. The e2e at 4x2048 (ours keep6 CUDA graph, Unsloth, standard QLoRA) and 1x16384 (ours keep4 eager, Unsloth).
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_fused_residuals.py --timeout=55 -rf \
  --tb=line 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -6 | tee "$OUT/gpu_tests_s15c.log"
echo "== epilogues $(date +%T)"
timeout 60 python3 bench/kernels/bench_lora_epilogues.py --out "$OUT/lora_epilogues_s15c.json" 2>&1 | tail -8
OURS="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host"
echo "== memory at the peak, keep7 $(date +%T)"
timeout 80 python3 bench/e2e/run_stack.py --stack ours --synthetic 8b --batch 4 --seq 2048 --ckpt offload $OURS \
  --keep-mlp-layers 7 --steps 2 --warmup 2 --memory-snapshot --out "$OUT/mem_4x2048_keep7_s15c.json" 2>&1 \
  | grep -E "tokens/s|Error" | tail -3
echo "== e2e 4x2048 $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 270 --shapes 4x2048 --stacks ours,unsloth,std_qlora --ckpt-ours offload \
  --ours-flags "$OURS --keep-mlp-layers 6 --cuda-graph" --out "$OUT/e2e_s15c.json" 2>&1 | grep -v "Failed to query" | tail -12
run_e2e e2e_s15c_16k 200 1x16384 "$OURS --keep-mlp-layers 4"
echo "== done $(date +%T)"
