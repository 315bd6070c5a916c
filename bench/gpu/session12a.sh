#!/usr/bin/env bash
# Session 12, call 1 (~420 s; carry .whl/core): the input embedding in pinned host memory and kept MLP outputs
# (models.settings.set_embeddings_on_host / set_keep_mlp_layers). Their GPU tests; what is live at the 4x2048 step's
# peak before and after; variants alternated on one loaded 8B model at 4x2048 and 1x16384.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels/test_embedding.py \
  tests/models/test_memory_settings.py "tests/kernels/test_lora.py::test_kept_mlp_outputs_spare_the_recompute_its_gate_and_up" \
  "tests/kernels/test_lora.py::test_kept_mlp_outputs_of_another_shape_are_refused" --timeout=120 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error|error" | tail -8 | tee "$OUT/gpu_tests_s12a.log"
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
run_ours mem_4x2048_base_s12a 70 $FLAGS --warmup 2 --steps 2 --memory-snapshot
run_ours mem_4x2048_hostkeep_s12a 70 $FLAGS --warmup 2 --steps 2 --memory-snapshot --embeddings-on-host --keep-mlp-layers 2
python3 - "$OUT" <<'PY'
import json, sys
for tag in ("base", "hostkeep"):
    d = json.load(open(f"{sys.argv[1]}/mem_4x2048_{tag}_s12a.json"))
    m = d.get("memory_at_peak", {})
    print(tag, d.get("tokens_per_s"), "peak", d.get("peak_gib"), "before", m.get("before_step_gib"), "+", m.get("step_peak_extra_gib"), m.get("error", ""))
    for site, mib, n in m.get("live_at_peak_mib", [])[:14]:
        print(f"   {mib:8.1f} MiB x{n:<4d} {site[:100]}")
PY
V="all+once+stash"
run_ours var_4x2048_s12a 200 $FLAGS --warmup 3 --steps 8 \
  --variants "$V,$V+host,$V+keep1,$V+host+keep1,$V+host+keep2,$V+host+keep3,$V+host+keep4,$V+host+keep2+graph,$V+graph,$V"
run_ours var_1x16384_s12a 150 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 \
  --variants "$V,$V+host+keep1,$V+host+keep2,$V+host+keep3,$V"
python3 - "$OUT" <<'PY'
import json, sys
for shape in ("4x2048", "1x16384"):
    try:
        d = json.load(open(f"{sys.argv[1]}/var_{shape}_s12a.json"))
    except Exception as exc:
        print(shape, "no result", exc); continue
    for name, v in d.get("variants", {}).items():
        print(f"{shape:8s} {name:36s} {v.get('status')} {v.get('tokens_per_s')} tok/s {v.get('step_ms_median')} ms peak {v.get('peak_gib')} GiB")
PY
echo "== done $(date +%T)"
