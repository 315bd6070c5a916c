#!/usr/bin/env bash
# Prepared in session 20, not run (~570 s; carry .whl/core: the whole suite collects the Ray tests too).
# Every GPU test (gpu and not slow) in one call: the whole suite last ran in session 3 (39 passed); session 20's try
# ran past 270 s and, with only the summary kept, left nothing (gpu_tests now keeps every test's line as it finishes).
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 560 gpu_tests_s21b.log tests
echo "== done $(date +%T)"
