#!/usr/bin/env bash
# Session 15, call 2 (~330 s; carry .whl/slim and .ab, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# 1. GPU tests of this session's LoRA changes: fp32-output gradient GEMMs, the adapters' one multi-tensor cast, the
#    residual add in the down projection's GEMM (kernel tests and the model's fused-residual tests).
# 2. SDPA's cuDNN and flash backends on the e2e attention shapes (the step uses cuDNN; at 4x2048 it runs ~230
#    TFLOP/s forward, against ~560 at 16,384).
# 3. A/B of the 4x2048 e2e setting, code at 428f827 (.ab/base, `git archive 428f827 raytune_llm`) against this
#    checkout, alternated in separate processes, twice.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels/test_lora.py \
  tests/models/test_fused_residuals.py \
  tests/kernels/test_cross_entropy_streamed.py::test_streamed_uses_the_fp32_output_gemm_and_saves_the_head \
  --timeout=160 -rf --tb=line 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -12 | tee "$OUT/gpu_tests_s15b.log"
echo "== attention backends $(date +%T)"
timeout 100 python3 bench/gpu/probe_attention.py --backends cudnn,flash --shapes 4x2048,1x16384,1x65536 \
  --out "$OUT/attn_backends_s15b.json" 2>&1 | grep -v Warning | tail -8
OURS="--synthetic 8b --batch 4 --seq 2048 --ckpt offload --stash-attention --dequantize-once --embeddings-on-host
  --last-layer-on-device --head-on-host --keep-mlp-layers 6 --cuda-graph"
for i in 1 2; do
  for v in base new; do
    root=$PWD; [ "$v" = base ] && root=$PWD/.ab/base
    echo "== ab $v $i $(date +%T)"
    PYTHONPATH=/tmp/site:$root timeout 100 python3 bench/e2e/run_stack.py --stack ours --out "/tmp/ab_${v}_$i.json" \
      $OURS 2>&1 | grep -E "tokens/s|Error|error" | tail -3
  done
done
python3 - "$OUT/ab_4x2048_s15b.json" <<'PY'
import glob, json, statistics, sys
runs = {}
for f in sorted(glob.glob("/tmp/ab_*_*.json")):
    d = json.load(open(f))
    runs[f.split("/")[-1][3:-5]] = {k: d.get(k) for k in ("status", "step_ms_median", "step_ms_all", "peak_gib",
                                                           "tokens_per_s", "losses", "environment")}
json.dump(runs, open(sys.argv[1], "w"), indent=1)
for v in ("base", "new"):
    ms = [r["step_ms_median"] for k, r in runs.items() if k.startswith(v) and r["step_ms_median"]]
    pk = [r["peak_gib"] for k, r in runs.items() if k.startswith(v)]
    print(f"{v:5s} medians {ms} mean {statistics.mean(ms) if ms else None} peak {pk}")
PY
echo "== done $(date +%T)"
