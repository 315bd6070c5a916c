#!/usr/bin/env bash
# Needs commit 3a4e21e: the K-extended GEMMs (kernels.lora._KCAT) and bench/kernels/bench_mlp_kcat.py were removed after this call.
# Session 23 call 1 (~150 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh): the LoRA MLP with
# gate and up finished inside their GEMMs (K-extended operands, `kernels.lora._KCAT`) against the rank-r epilogue
# kernels, at 65,536, 16,384 and 8,192 rows, the activation kernel's tile swept; then the GPU tests of the LoRA
# kernels and the GPU fidelity check. Prediction at 65,536 rows (session 21's sweep: activation kernels with the dot at
# 0.62-0.76 of copy, plain SwiGLU at 0.96): the MLPs of a 64k step 30-60 ms faster; bits equal across the
# grad / checkpointed / kept paths in each setting, the settings within bf16 rounding of each other.
set -o pipefail
source bench/gpu/_env.sh
for spec in 65536:16 16384:14 8192:13; do
  echo "== MLP kcat ${spec%%:*} rows $(date +%T)"
  timeout 150 python3 bench/kernels/bench_mlp_kcat.py --rows "${spec%%:*}" --kept "${spec##*:}" \
    --out "$OUT/mlp_kcat_s23a_${spec%%:*}.json" 2>&1 | tail -14
done
gpu_tests 200 gpu_tests_s23a_h200.log tests/kernels/test_lora.py tests/kernels/test_swiglu.py tests/models/test_gpu_fidelity.py
echo "== done $(date +%T)"
