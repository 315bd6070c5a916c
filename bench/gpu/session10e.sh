#!/usr/bin/env bash
# Session 10, call 6 (~150 s; carry .whl/core): the final code's 1x16384 step profiled (the largest remaining costs
# at the long shape after the O projection joined the stash), and the LoRA SwiGLU GPU tests at the final tiles.
set -o pipefail
source bench/gpu/_env.sh
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py -k "lean or finishing" --timeout=60 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -4 | tee "$OUT/gpu_tests_s10e.log"
run_ours prof_1x16384_s10e 80 --synthetic 8b --batch 1 --seq 16384 --ckpt offload --stash-attention --dequantize-once \
  --warmup 1 --steps 2 --profile
python3 - "$OUT" <<'PY'
import json, sys
d = json.load(open(f"{sys.argv[1]}/prof_1x16384_s10e.json"))
print("1x16384", d.get("tokens_per_s"), d.get("step_ms_median"), d.get("peak_gib"))
for k, ms, n in d["profile"]["top"][:16]:
    print(f"   {ms:9.2f} ms {n:5d}  {k[:80]}")
PY
echo "== done $(date +%T)"
