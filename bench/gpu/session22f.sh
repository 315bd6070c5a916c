#!/usr/bin/env bash
# Session 22 (~300 s; carry .whl/core: the whole suite collects the Ray tests too). Every GPU test (gpu and not slow)
# at the session's code: the default kernels' shared SwiGLU tile math (lora_swiglu.swiglu_grad_tile /
# swiglu_store_tile, factored out after session 21's run of the suite) has run on the GPU only inside the e2e since.
# Session 21: 86 passed, 2 skipped in 250 s. Prediction: the same, plus the fused kernels' 4 (passed in session22a).
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 420 gpu_tests_s22f.log tests
echo "== done $(date +%T)"
