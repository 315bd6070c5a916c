#!/usr/bin/env bash
# Session 10, call 1 (~480 s; carry .whl/core). What changed since session 9's calls, checked and timed on the GPU:
# 1. GPU tests: the O projection inside the attention stash (models/test_checkpointing.py, bf16 on CUDA, llama and
#    qwen3, packed and not), the LoRA SwiGLU kernels at their new 32x128x4 tiles and with the CUDA-core rank update
#    (RANK_FMA), dequantize_once's last use.
# 2. The LoRA SwiGLU tile sweep, with RANK_FMA variants (bench/kernels/sweep_lora_swiglu.py).
# 3. The O projection in the stash against the stash without it, alternated on one loaded model (A B A B), at
#    4x2048 and 1x16384.
# 4. A profile of the 4x2048 step with both (the kernel breakdown for the notes).
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora.py \
  -k "lean or finishing or matches_reference or cuda_cores or dequantize_once" --timeout=140 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -8 | tee "$OUT/gpu_tests_s10a.log"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_checkpointing.py -k stash --timeout=80 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -8 | tee -a "$OUT/gpu_tests_s10a.log"
echo "== sweep $(date +%T)"
timeout 100 python3 bench/kernels/sweep_lora_swiglu.py --out "$OUT/lora_swiglu_sweep_s10a.json" 2>&1 | tail -4
S4="--synthetic 8b --batch 4 --seq 2048 --ckpt offload --dequantize-once"
S16="--synthetic 8b --batch 1 --seq 16384 --ckpt offload --dequantize-once"
run_ours var_4x2048_s10a 110 $S4 --warmup 2 --steps 6 \
  --variants all+once+stashattn,all+once+stash,all+once+stashattn,all+once+stash
run_ours var_1x16384_s10a 110 $S16 --warmup 1 --steps 4 --variants all+once+stashattn,all+once+stash,all+once+stash
run_ours prof_4x2048_s10a 70 $S4 --stash-attention --warmup 2 --steps 4 --profile
python3 - "$OUT" <<'PY'
import json, sys, os
o = sys.argv[1]
for name in sorted(os.listdir(o)):
    if not name.endswith("_s10a.json") or name.startswith("lora_swiglu"):
        continue
    d = json.load(open(f"{o}/{name}"))
    rows = d.get("variants") or {"-": d}
    for v, r in rows.items():
        print(f"{name:24s} {v:22s} tok/s {r.get('tokens_per_s')} ms {r.get('step_ms_median')} peak {r.get('peak_gib')}")
    prof = d.get("profile") or {}
    for k, ms, n in (prof.get("top") or [])[:14]:
        print(f"   {ms:9.2f} ms {n:5d}  {k[:70]}")
    tl = prof.get("timeline") or {}
    if tl:
        print("   timeline", {k: tl.get(k) for k in ("span_ms", "busy_ms", "idle_ms", "idle_by_cause_ms")})
s = json.load(open(f"{o}/lora_swiglu_sweep_s10a.json"))
for r in s["rows"]:
    print(f"sweep {r['kernel']:10s} {r['setting']:10s} {r.get('ms')} ms frac {r.get('bandwidth_fraction')} "
          f"exact {r.get('exact')} {r.get('error', '')}")
PY
echo "== done $(date +%T)"
