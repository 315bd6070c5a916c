# Sourced by the device-call scripts: install the carried wheels and set the environment.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/core/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  RAY_USAGE_STATS_ENABLED=0 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token
if [ -d .whl/anchors ] && [ ! -d /tmp/site_anchors/unsloth ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_anchors .whl/anchors/*.whl || echo ANCHOR_WHEELS_FAILED
fi
# run_ours NAME TIMEOUT ARGS...: one run_stack.py process for ours into $OUT/NAME.json, its variant/profile lines shown.
run_ours() {
  local name=$1 t=$2; shift 2
  echo "== $name $(date +%T)"
  timeout "$t" python3 bench/e2e/run_stack.py --stack ours --out "$OUT/$name.json" "$@" 2>&1 \
    | grep -E "variant|loaded|Error|error|ms |top" | tail -40
}
