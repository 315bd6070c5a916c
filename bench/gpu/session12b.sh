#!/usr/bin/env bash
# Prepared in session 11, not run: what session 11's 2-GPU calls left unfinished (nvidia-h200-x2). The 2-GPU tests
# (ZeRO-3's bf16 NF4 partitioning ~70 s; DDP and ZeRO-3 through the CLI, tests/test_multigpu_train.py, never reported:
# call 3's 170 s limit cut them), then the whole-GPU sweep in both modes (call 3 finished only the concurrent one).
# ~500 s; carry .whl/core.
set -o pipefail
source bench/gpu/_env.sh
multigpu_tests 330 gpu_tests_multigpu_s12b.log
gpu_sweep 240 s12_gpu_per_trial
echo "== done $(date +%T)"
