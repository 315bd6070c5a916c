#!/usr/bin/env bash
# Session 17, call 4 (~340 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh).
# 1. test_host_weights again: call 1's recorded-step test failed because its two models drew different lora_A
#    (PEFT's init uses the global RNG); the test now copies the reference's LoRA weights.
# 2. 1x65536, one process per variant: call 3 ran +hostkeep13 after a +wh+keep3+hostkeep12 variant in the same
#    process, whose pinned blocks stayed in torch's host cache (26,375 ms a step, then the third variant killed).
#    run_stack now gives the cache back between variants and records pinned_host_gib; `free` sampled each 2 s.
#    Count (sharding.host_memory): +hostkeep13 117.4 GiB, +stashattn+hostkeep18 119.5 GiB.
# 3. 1x16384: the weights on the host fund more device-kept layers beside +hostkeep8.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/models/test_host_weights.py \
  --timeout=110 -rf --tb=line 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -8 | tee "$OUT/gpu_tests_s17f.log"
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev+headhost"
VA="all+once+stashattn+host+lastdev+headhost"
sample() { while sleep 2; do free -m | awk '/Mem:/{print $3}'; done > "$OUT/free_$1.log"; }
for v in "$V+keep2+hostkeep13" "$VA+keep2+hostkeep18"; do
  tag=$(echo "$v" | tr '+' '_' | sed 's/.*headhost_//')
  sample "$tag" & S=$!
  run_ours "var_1x65536_s17f_$tag" 170 $FLAGS --mlp-chunk-tokens 0 --batch 1 --seq 65536 --warmup 1 --steps 2 --variants "$v"
  kill $S; echo "max used MiB: $(sort -n "$OUT/free_$tag.log" | tail -1)"
done
run_ours var_1x16384_s17f 200 $FLAGS --batch 1 --seq 16384 --warmup 2 --steps 4 \
  --variants "$V+keep4+hostkeep8,$V+wh+keep7+hostkeep8,$V+wh+keep7+hostkeep10,$V+wh+keep6+hostkeep8"
python3 - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/var_*_s17f*.json")):
    for name, v in json.load(open(f)).get("variants", {}).items():
        print(f"{f.rsplit('/', 1)[1][4:11]} {name.split('headhost')[-1] + ('(stashattn)' if 'stashattn' in name else ''):<24} {v.get('status')} "
              f"{v.get('step_ms_median')} ms {v.get('step_ms_all')} peak {v.get('peak_gib')} GiB pinned {v.get('pinned_host_gib')} GiB")
PY
echo "== done $(date +%T)"
