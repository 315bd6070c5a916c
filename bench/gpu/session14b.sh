#!/usr/bin/env bash
# Session 14, call 2 (~480 s; carry .whl/slim and .whl/anchors, WHEELS=.whl/slim): the LM head in pinned host memory,
# streamed in by the loss (models.settings.set_head_on_host, run_stack +headhost / --head-on-host). GPU tests of the
# streamed loss and of the model setting; 4x2048 CUDA-graph variants with the head on the host and more kept MLP
# layers, against session 13's keep4 (all with the last layer on the device); then the e2e against Unsloth with the
# most kept layers whose variant peak stays at or under the keep4 baseline's.
set -o pipefail
source bench/gpu/_env.sh
echo "== GPU tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cross_entropy_streamed.py \
  tests/models/test_head_on_host.py --timeout=140 -rf --tb=short 2>&1 | grep -vE "^\s*$" | tail -25 | tee "$OUT/gpu_tests_s14b.log"
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once"
V="all+once+stash+host+lastdev"
run_ours var_4x2048_s14b 230 $FLAGS --warmup 3 --steps 6 \
  --variants "$V+keep4+graph,$V+keep4+headhost+graph,$V+keep5+headhost+graph,$V+keep6+headhost+graph,$V+keep7+headhost+graph"
show_variants s14b 4x2048
KEEP=$(python3 - "$OUT/var_4x2048_s14b.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))["variants"]
base = v.get("all+once+stash+host+lastdev+keep4+graph", {}).get("peak_gib") or 0
best = 4
for k in (5, 6, 7):
    r = v.get(f"all+once+stash+host+lastdev+keep{k}+headhost+graph", {})
    if r.get("status") == "ok" and r.get("peak_gib", 99) <= base + 0.02:
        best = k
print(best)
PY
)
echo "== e2e keep $KEEP"
run_e2e e2e_s14b 210 4x2048 "--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host --keep-mlp-layers $KEEP --cuda-graph"
echo "== done $(date +%T)"
