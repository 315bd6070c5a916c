#!/usr/bin/env bash
# Device call 2 of session 6 (~450 s), issue 3: the fused-CE sweep with the reversed gradient pass (trained and frozen
# head, beside Liger), the RoPE sweep with Q and K loads issued first, and the GPU tests of the models and of NF4
# (pair stores) under this tree.
set -o pipefail
source bench/gpu/_env.sh
echo "== flce sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 150 python3 bench/kernels/sweep_flce.py \
  --settings bf16:1024:0,bf16:1024:1,bf16:2048:1,frozen:1024:0,frozen:1024:1 --out "$OUT/flce_sweep.json" 2>&1 \
  | grep -vE "Warning|warn|Configuration class" | tail -12
echo "== rope sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 100 python3 bench/kernels/sweep_rope.py --warps 4,8 \
  --loads-first 1,0 --out "$OUT/rope_sweep.json" 2>&1 | grep -vE "Warning|warn|Configuration class" | tail -20
echo "== gpu tests $(date +%T)"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_nf4.py --timeout=90 -rf --durations=5 2>&1 \
  | grep -vE "Warning|warn" | tail -12 | tee "$OUT/gpu_tests_s6b.log"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models --timeout=190 -rf --durations=8 2>&1 \
  | grep -vE "Warning|warn" | tail -16 | tee -a "$OUT/gpu_tests_s6b.log"
echo "== done $(date +%T)"
