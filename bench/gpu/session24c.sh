#!/usr/bin/env bash
# Session 24 call 4 (~150 s; carry .whl/slim): the RMSNorm forward's band walk (each program normalises a band of
# rows, loading the next row while the current one reduces and stores) against one program a row. First its GPU tests
# (the band walk bit for bit against one program a row at training widths), then the forward settings at 65,536 and
# 8,192 rows and the backward's at 65,536 (swept at 8,192 only, session 1). Prediction: a band setting at 0.80-0.90 of
# copy against 0.65 for one program a row (session 21's profile: 0.39 ms a call at 65,536 x 4,096, 129 calls a 64k
# step), same bits at the default warps; the backward's best within 5% of (2, 1, 3).
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 120 gpu_tests_s24c.log tests/kernels/test_rms_norm.py
timeout 150 python3 bench/kernels/sweep_rms_norm.py --shapes 65536x4096 --out "$OUT/rms_norm_sweep_s24c_65536.json" \
  2>&1 | tail -40
timeout 60 python3 bench/kernels/sweep_rms_norm.py --shapes 8192x4096 --only fwd \
  --out "$OUT/rms_norm_sweep_s24c_8192.json" 2>&1 | tail -20
echo "== done $(date +%T)"
