#!/usr/bin/env bash
# Device call 5 of session 5 (~150 s), issue 3: the NF4 sweep again with the per-element nibble shift as a second
# way to unpack (each setting first checked bit-exact against bitsandbytes at blocksize 64 and 4096).
set -o pipefail
source bench/gpu/_env.sh
echo "== nf4 sweep $(date +%T)"
PYTHONPATH=/tmp/site:$PWD:/tmp/site_anchors timeout 150 python3 bench/kernels/sweep_nf4.py --out "$OUT/nf4_sweep2.json" \
  2>&1 | grep -vE "Warning|warn|Configuration class" | tail -32
echo "== done $(date +%T)"
