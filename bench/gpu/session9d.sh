#!/usr/bin/env bash
# Session 9, call 4 (~350 s), issue 10 item 5: four 0.25-GPU sweep trials at once against the same four one after
# another (bench/tune/bench_fractional.py; session 2's call ran out of time after the concurrent mode).
set -o pipefail
source bench/gpu/_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== fractional sweep $(date +%T)"
timeout 520 python3 bench/tune/bench_fractional.py --steps 60 --out "$OUT" 2>&1 \
  | grep -vE "^\(|INFO|WARNING|Warning|warn|Failed to query" | tail -14
echo "== done $(date +%T)"
