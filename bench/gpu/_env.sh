# Sourced by the device-call scripts: install the carried wheels (WHEELS=.whl/slim: .whl/core without Ray, for calls that
# carry .whl/anchors too and stay under the carry limit; make it with
# `mkdir -p .whl/slim && cp $(ls .whl/core/*.whl | grep -v /ray-) .whl/slim/`) and set the environment.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl/core}"/*.whl || exit 1
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
    | grep -E "variant|loaded|Error|error|ms |top|timeline|by kind" | tail -40
}
# gpu_tests TIMEOUT LOG FILE...: the GPU tests (gpu and not slow) of those files, one line per test into $OUT/LOG as
# they finish (a run cut by TIMEOUT keeps what finished: session 20's whole-suite run ran past 270 s and, with only the
# summary kept, left nothing), the summary shown.
gpu_tests() {
  local t=$1 log=$2; shift 2
  echo "== GPU tests $(date +%T)"
  timeout "$t" python3 -m pytest -v -p no:cacheprovider -m "gpu and not slow" "$@" --timeout=$((t - 10)) -rf \
    --tb=line --durations=15 2>&1 | tee "$OUT/$log" | grep -E "passed|failed|FAILED|Error|assert" | tail -12
}
# run_e2e NAME BUDGET SHAPES OURS_FLAGS [STACKS]: the e2e protocol for ours and Unsloth (or STACKS) into
# $OUT/NAME.json, its table shown. The model is built first, outside BUDGET (make_model.py returns at once when it is
# there): on a fresh machine the build took ~80 s of the budget and bench_e2e skipped Unsloth (sessions 21 and 22).
# The device call's timeout must allow for it.
run_e2e() {
  echo "== e2e $3 $(date +%T)"
  python3 bench/e2e/make_model.py 2>&1 | tail -1
  python3 bench/e2e/bench_e2e.py --budget-s "$2" --shapes "$3" --stacks "${5:-ours,unsloth}" --ckpt-ours offload \
    --ours-flags "$4" --out "$OUT/$1.json" 2>&1 | grep -v "Failed to query" | tail -16
}
# multigpu_tests TIMEOUT LOG: the 2-GPU tests (ZeRO-3's bf16 NF4 partitioning; DDP and ZeRO-3 through the CLI).
multigpu_tests() {
  echo "== 2-GPU tests $(date +%T)"
  timeout "$1" python3 -m pytest -q -m multigpu tests/sharding/test_zero3_qlora.py tests/test_multigpu_train.py \
    -p no:cacheprovider 2>&1 | grep -E "passed|failed|FAILED|Error|skipped" | tail -8 | tee "$OUT/$2"
}
# gpu_sweep TIMEOUT TAG: 2 sweep trials that each own a whole GPU, at once and then one after the other.
gpu_sweep() {
  echo "== sweep, 1 GPU per trial $(date +%T)"
  timeout "$1" python3 bench/tune/bench_fractional.py --trials 2 --fraction 1 --steps 30 --tag "$2" --out "$OUT" 2>&1 \
    | grep -vE "^\(|INFO|WARNING|Warning|warn" | tail -6
}
# run_each PREFIX TIMEOUT "FLAGS" VARIANT...: each variant in its own process (torch's pinned cache must not carry
# over), `free -m` sampled every 2 s into $OUT/free_TAG.log, into $OUT/PREFIX_TAG.json (TAG: the variant's name less
# all+once+stash, '+' as '_').
run_each() {
  local prefix=$1 t=$2 flags=$3 v tag S; shift 3
  for v in "$@"; do
    tag=$(echo "$v" | tr '+' '_' | sed 's/all_once_stash_//')
    ( while sleep 2; do free -m | awk '/Mem:/{print $3}'; done > "$OUT/free_$tag.log" ) & S=$!
    # shellcheck disable=SC2086
    run_ours "${prefix}_$tag" "$t" $flags --variants "$v"
    kill $S; echo "max used MiB: $(sort -n "$OUT/free_$tag.log" | tail -1)"
  done
}
# show_variants TAG SHAPE...: the variants of $OUT/var_SHAPE_TAG.json (run_ours --variants), one line each.
show_variants() {
  python3 - "$OUT" "$@" <<'PY'
import json, sys
out, tag, *shapes = sys.argv[1:]
for shape in shapes:
    try:
        d = json.load(open(f"{out}/var_{shape}_{tag}.json"))
    except Exception as exc:
        print(shape, "no result", exc); continue
    for name, v in d.get("variants", {}).items():
        print(f"{shape:8s} {name:40s} {v.get('status')} {v.get('step_ms_median')} ms {v.get('step_ms_all')} peak {v.get('peak_gib')} GiB")
PY
}
