#!/usr/bin/env bash
# Session 23 call 3 (~200 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh): the LoRA SwiGLU
# kernels as row-span programs (kernels/lora_swiglu.py now), their launch settings swept at 65,536, 16,384 and 8,192
# rows; then the GPU tests of the LoRA kernels. Call 2 timed the same loop as a bench-only kernel with a runtime span
# (65,536 rows: 2.60 / 1.51 / 3.07 / 3.08 ms against the one-tile kernels' 3.06 / 1.86 / 3.53 / 4.35); the library's
# span is now a power of two fixed at compile time. Prediction at 65,536: within 5% of call 2's best, every setting
# exact against the first (one 16-row step a program, as the one-tile kernels ran).
set -o pipefail
source bench/gpu/_env.sh
for n in 65536 16384 8192; do
  echo "== sweep $n rows $(date +%T)"
  timeout 200 python3 bench/kernels/sweep_lora_swiglu.py --rows $n --out "$OUT/lora_swiglu_sweep_s23c_$n.json" 2>&1 \
    | python3 -c "
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        print(line.rstrip()); continue
    print(f\"{r['setting']:18} {r['kernel']:11} {r.get('ms')} ms {r.get('bandwidth_fraction')} exact {r.get('exact')} {r.get('error', '')}\")
"
done
gpu_tests 150 gpu_tests_s23c_h200.log tests/kernels/test_lora.py
echo "== done $(date +%T)"
