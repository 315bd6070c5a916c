#!/usr/bin/env bash
# Session 13, call 3 (~300 s; carry .whl/slim, WHEELS=.whl/slim): the residual adds inside the RMSNorm kernels
# (models.settings.set_fused_residuals; a recompute's last add keeps no values) and the layer before's attention stash
# fetched when this layer's attention backward starts. GPU tests; variants alternated on one loaded 8B model
# (+sep: the adds as separate kernels, as before), with one to three more kept MLP layers; the new peak's contents.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels/test_rms_norm.py \
  tests/models/test_fused_residuals.py tests/models/test_attention_stash.py tests/models/test_checkpointing.py \
  tests/models/test_memory_settings.py --timeout=120 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error|error" | tail -8 | tee "$OUT/gpu_tests_s13c.log"
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host"
run_ours var_4x2048_s13c 200 $FLAGS --warmup 3 --steps 8 \
  --variants "$V+keep3+sep+graph,$V+keep3+graph,$V+keep4+graph,$V+keep5+graph,$V+keep6+graph,$V+keep3+sep+graph,$V+keep3+graph"
run_ours var_1x16384_s13c 150 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 \
  --variants "$V+keep3+sep,$V+keep3,$V+keep4,$V+keep3+sep,$V+keep3"
run_ours mem_4x2048_s13c 70 $FLAGS --embeddings-on-host --keep-mlp-layers 3 --warmup 2 --steps 2 --memory-snapshot
python3 - "$OUT" <<'PY'
import json, sys
for shape in ("4x2048", "1x16384"):
    try:
        d = json.load(open(f"{sys.argv[1]}/var_{shape}_s13c.json"))
    except Exception as exc:
        print(shape, "no result", exc); continue
    for name, v in d.get("variants", {}).items():
        print(f"{shape:8s} {name:36s} {v.get('status')} {v.get('tokens_per_s')} tok/s {v.get('step_ms_median')} ms peak {v.get('peak_gib')} GiB")
d = json.load(open(f"{sys.argv[1]}/mem_4x2048_s13c.json"))
m = d.get("memory_at_peak", {})
print("mem", d.get("tokens_per_s"), "peak", d.get("peak_gib"), "before", m.get("before_step_gib"), "+", m.get("step_peak_extra_gib"))
for site, mib, n in m.get("live_at_peak_mib", [])[:12]:
    print(f"   {mib:8.1f} MiB x{n:<4d} {site[:100]}")
PY
echo "== done $(date +%T)"
