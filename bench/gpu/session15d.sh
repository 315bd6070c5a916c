#!/usr/bin/env bash
# Session 15, call 4 (~510 s; carry .whl/slim, .whl/anchors and .ab; WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# 1. GPU tests: kernels.lora_pair, the LoRA ops on it, kept MLP outputs (same bits as the recompute), fused residuals.
# 2. bench_lora_epilogues: lora_pair against cuBLAS's two products at 8192 x {14336, 4096, 1024}, a tile sweep.
# 3. A/B of the 4x2048 e2e setting: e770f87 (.ab/base, two GEMMs a pair) against this checkout (lora_pair).
# 4. The e2e at 4x2048 (ours keep6 CUDA graph, Unsloth, standard QLoRA) with whichever code ran the faster A/B step.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 110 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels/test_lora_pair.py \
  tests/kernels/test_lora.py tests/models/test_memory_settings.py tests/models/test_fused_residuals.py \
  --timeout=100 -rf --tb=line 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -12 | tee "$OUT/gpu_tests_s15d.log"
echo "== epilogues and pair $(date +%T)"
timeout 60 python3 bench/kernels/bench_lora_epilogues.py --out "$OUT/lora_pair_s15d.json" 2>&1 | grep pair | tail -16
OURS="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host"
for v in base new; do
  root=$PWD; [ "$v" = base ] && root=$PWD/.ab/base
  echo "== ab $v $(date +%T)"
  PYTHONPATH=/tmp/site:$root timeout 80 python3 bench/e2e/run_stack.py --stack ours --synthetic 8b --batch 4 \
    --seq 2048 --ckpt offload $OURS --keep-mlp-layers 6 --cuda-graph --out "/tmp/ab_$v.json" 2>&1 | grep -E "tokens/s|Error"
done
pick=$(python3 - "$OUT/ab_4x2048_s15d.json" <<'PY'
import json, sys
runs = {v: json.load(open(f"/tmp/ab_{v}.json")) for v in ("base", "new")}
keep = ("status", "step_ms_median", "step_ms_all", "peak_gib", "tokens_per_s", "losses")
json.dump({v: {k: d.get(k) for k in keep} for v, d in runs.items()}, open(sys.argv[1], "w"), indent=1)
ms = {v: d.get("step_ms_median") or 1e9 for v, d in runs.items()}
print("new" if ms["new"] <= ms["base"] else "base")
PY
)
echo "== e2e 4x2048 with $pick $(date +%T)"
# bench_e2e puts the checkout first on its children's path, so the base code replaces the checkout's here (a copy)
[ "$pick" = base ] && rm -rf raytune_llm && cp -r .ab/base/raytune_llm raytune_llm
python3 bench/e2e/bench_e2e.py --budget-s 300 --shapes 4x2048 \
  --stacks ours,unsloth,std_qlora --ckpt-ours offload --ours-flags "$OURS --keep-mlp-layers 6 --cuda-graph" \
  --out "$OUT/e2e_s15d_$pick.json" 2>&1 | grep -v "Failed to query" | tail -12
echo "== done $(date +%T)"
