#!/usr/bin/env bash
# Session 11, calls 1-2 (nvidia-h200-x2; call 1 found the host-tensor stop vote that NCCL refuses): issue 13's runs through the real CLI with model.random_weights. Ray Train DDP
# with the fused QLoRA 8B at 4x2048 per GPU on 1 and 2 GPUs; ZeRO-3 QLoRA at 70B shapes, sequence 2048, over 2 GPUs
# beside the planner. The 2-GPU tests follow in session11b.sh. Carry .whl/core.
set -o pipefail
source bench/gpu/_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
echo "== multigpu $(date +%T)"
timeout 480 python3 bench/multigpu/bench_multigpu.py --parts dp,zero3 --gpus 2 --timeout 240 --tag s11 --out "$OUT" 2>&1 \
  | grep -vE "Failed to query|Warning|warn|^\s*$" | tail -30
echo "== done $(date +%T)"
