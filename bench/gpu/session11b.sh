#!/usr/bin/env bash
# Session 11, call 3 (nvidia-h200-x2): ZeRO-3 QLoRA at 70B shapes again after the per-layer release of the frozen
# weights a recompute gathers (call 2: 55.8 GiB per GPU); the 2-GPU tests (ZeRO-3's bf16 NF4 partitioning; DDP and
# ZeRO-3 through the CLI); a sweep of 2 trials that each own a whole GPU, at once and one after the other. Carry .whl/core.
set -o pipefail
source bench/gpu/_env.sh
echo "== zero3 70B $(date +%T)"
timeout 230 python3 bench/multigpu/bench_multigpu.py --parts zero3 --gpus 2 --timeout 220 --tag s11b --out "$OUT" 2>&1 \
  | grep -vE "Failed to query|Warning|warn|^\s*$" | tail -8
multigpu_tests 170 gpu_tests_multigpu_s11.log
gpu_sweep 170 s11_gpu_per_trial
echo "== done $(date +%T)"
