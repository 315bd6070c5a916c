#!/usr/bin/env bash
# Device call 6 of session 4 (~120 s): RMSNorm after the shared-memory guard on its pipelined backward: the GPU
# tests (4096, 8192 and 16384 wide, fp32 and bf16) and the kernel bench beside Liger.
set -o pipefail
source bench/gpu/_env.sh
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rms_norm.py 2>&1 | tail -3 | tee "$OUT/gpu_tests_rms_s4e.log"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 100 python3 bench/kernels/run_all.py --only rms_norm --reps 30 \
  --out "$OUT/kernels_s4e.json" 2>&1 | grep -E "rms_norm .*(ours|liger)|speedup_vs_liger\"|bandwidth_fraction\"" | tail -12
