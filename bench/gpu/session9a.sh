#!/usr/bin/env bash
# Prepared at the end of session 8, not run yet (no device time left): the first device call of session 9 (~300 s).
# 1. GPU tests of what changed after session 8's last call: the LoRA SwiGLU kernels' shared finishing helper
#    (lean and finishing tests, bit for bit), the CUDA-graph step (models/test_graphs.py: capacity, host tensors).
# 2. Where the compute stream idles at 4x2048 and 1x16384 (run_stack --profile -> profile.timeline): session 8 found
#    ~63 ms of a 635 ms 4x2048 step with no compute kernel running, not removed by a CUDA graph.
# 3. The LoRA SwiGLU kernels' tiles, the lean recompute's finishing backward included.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py -k "lean or finishing or matches_reference" \
  --timeout=100 -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6 | tee "$OUT/gpu_tests_s9a.log"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_graphs.py --timeout=80 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -6 | tee -a "$OUT/gpu_tests_s9a.log"
run_ours prof8b_4x2048_s9a 70 --synthetic 8b --batch 4 --seq 2048 --ckpt offload --stash-attention --dequantize-once \
  --warmup 2 --steps 4 --profile
run_ours prof8b_1x16384_s9a 60 --synthetic 8b --batch 1 --seq 16384 --ckpt offload --stash-attention --dequantize-once \
  --warmup 1 --steps 2 --profile
python3 - "$OUT" <<'PY'
import json, sys
for name in ("prof8b_4x2048_s9a", "prof8b_1x16384_s9a"):
    try:
        tl = json.load(open(f"{sys.argv[1]}/{name}.json"))["profile"]["timeline"]
    except Exception as exc:  # noqa: BLE001
        print(name, "no timeline:", exc)
        continue
    print(name, {k: tl.get(k) for k in ("span_ms", "busy_ms", "idle_ms", "idle_by_cause_ms", "n_gaps")})
    for g in tl.get("gaps", [])[:8]:
        print("  ", g)
PY
echo "== lora swiglu sweep $(date +%T)"
timeout 60 python3 bench/kernels/sweep_lora_swiglu.py --settings 64:64:4,64:128:8,128:64:4,32:128:4 \
  --out "$OUT/lora_swiglu_sweep_s9a.json" 2>&1 | tail -3
echo "== done $(date +%T)"
