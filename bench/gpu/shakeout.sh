#!/usr/bin/env bash
# One device call: GPU tests of kernels and models, the quickstart with one GPU worker, kernel benches,
# and a 2-layer end-to-end stack check. Each phase has its own time limit so the call ends in ~9.5 min.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/core/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  RAY_USAGE_STATS_ENABLED=0 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_anchors .whl/anchors/*.whl || echo ANCHOR_WHEELS_FAILED
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
echo "== gpu tests $(date +%T)"
timeout 170 python3 -m pytest -q -m gpu tests/kernels tests/models -p no:cacheprovider -x --timeout=160 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
echo "== quickstart on GPU $(date +%T)"
timeout 150 python3 -m raytune_llm train conf/quickstart.yaml train.num_workers=1 output_dir=/tmp/runs 2>&1 \
  | grep -v "Failed to query Ray Train Controller" | grep -E "raytune-llm|exact|loss|run folder|workers|wall|Error|error" | tail -25 | tee "$OUT/quickstart_gpu.log"
cp /tmp/runs/quickstart/summary.json "$OUT/quickstart_summary.json" 2>/dev/null
echo "== kernel bench $(date +%T)"
left=$(( 560 - $(date +%s) + t0 ))
timeout $(( left > 200 ? left - 120 : 60 )) python3 bench/kernels/run_all.py --only rms_norm rope swiglu fused_linear_cross_entropy lora nf4 2>&1 | tail -40 | tee "$OUT/kernels.log"
cp bench/results/kernels_*.json "$OUT/" 2>/dev/null
echo "== e2e 2-layer check $(date +%T)"
left=$(( 580 - $(date +%s) + t0 ))
timeout $(( left > 30 ? left : 10 )) python3 bench/e2e/bench_e2e.py --model /tmp/rtl_bench/llama8b_2l --layers 2 --shapes 4x2048 \
  --stacks std_qlora,ours --steps 3 --warmup 1 --out "$OUT/e2e_check.json" 2>&1 | tail -25 | tee "$OUT/e2e_check.log"
echo "== done $(date +%T)"
