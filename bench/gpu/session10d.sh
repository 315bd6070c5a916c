#!/usr/bin/env bash
# Session 10, call 4 (~400 s; carry .whl/core and .whl/anchors): Liger at packed 8192 (skipped by call 2's budget),
# resumed into the session's e2e file; narrower LoRA SwiGLU tiles; ours alone at 1x65536 (Unsloth: session 8).
set -o pipefail
source bench/gpu/_env.sh
echo "== e2e liger packed $(date +%T)"
cp bench/results/e2e_h200_20261129_s10.json "$OUT/e2e_s10d.json"
python3 bench/e2e/bench_e2e.py --budget-s 150 --resume-from "$OUT/e2e_s10d.json" --shapes packed_8192 --stacks ours,unsloth,std_qlora,liger \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once" --out "$OUT/e2e_s10d.json" 2>&1 \
  | grep -v "Failed to query" | tail -14
echo "== sweep $(date +%T)"
timeout 80 python3 bench/kernels/sweep_lora_swiglu.py --out "$OUT/lora_swiglu_sweep_s10d.json" 2>&1 | tail -3
run_ours ours_1x65536_s10d 170 --synthetic 8b --batch 1 --seq 65536 --ckpt offload --dequantize-once --stash-attention \
  --mlp-chunk-tokens 0 --warmup 1 --steps 2
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
s = json.load(open(f"{o}/lora_swiglu_sweep_s10d.json"))
for r in s["rows"]:
    print(f"sweep {r['kernel']:10s} {r['setting']:10s} {r.get('ms')} ms frac {r.get('bandwidth_fraction')} exact {r.get('exact')}")
try:
    d = json.load(open(f"{o}/ours_1x65536_s10d.json"))
    print("1x65536 ours", d.get("tokens_per_s"), d.get("step_ms_median"), d.get("peak_gib"), d.get("losses"))
except Exception as exc:  # noqa: BLE001
    print("1x65536:", exc)
PY
echo "== done $(date +%T)"
