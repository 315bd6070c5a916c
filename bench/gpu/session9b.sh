#!/usr/bin/env bash
# Session 9, call 2 (~250 s): where the 4x2048 step's compute stream idles.
# Call 1 (session9a.sh) found 93 ms idle in a 665 ms profiled eager step, but its cause split is not usable:
# 'launch' came out 0 everywhere (the launch correlation does not match) and 'copy' only says a copy overlapped.
# 1. Profiles of one eager step and of one graph replay (no host in the replay: what idles there is the GPU's own
#    waits), every event dumped (.events.json.gz) for study off the machine.
# 2. The copies' share: offload with and without the attention stash (224 vs 64 MiB to host per layer), eager and
#    recorded, on one loaded model.
# 3. The forward's wait for a layer's copies to host two layers later (release_copied): three and four layers.
set -o pipefail
source bench/gpu/_env.sh
S4="--synthetic 8b --batch 4 --seq 2048 --ckpt offload --dequantize-once"
run_ours prof_eager_4x2048_s9b 70 $S4 --stash-attention --warmup 2 --steps 4 --profile
run_ours prof_graph_4x2048_s9b 80 $S4 --stash-attention --warmup 3 --steps 4 --cuda-graph --profile
run_ours var_4x2048_s9b 150 $S4 --warmup 2 --steps 6 --variants all+once+stash,all+once,all+once+stash+graph,all+once+graph
RAYTUNE_RELEASE_LAG=3 run_ours lag3_4x2048_s9b 60 $S4 --stash-attention --warmup 2 --steps 6
RAYTUNE_RELEASE_LAG=4 run_ours lag4_4x2048_s9b 60 $S4 --stash-attention --warmup 2 --steps 6
python3 - "$OUT" <<'PY'
import json, sys, os
o = sys.argv[1]
for name in sorted(os.listdir(o)):
    if not name.endswith("_s9b.json"):
        continue
    d = json.load(open(f"{o}/{name}"))
    rows = d.get("variants") or {"-": d}
    for v, r in rows.items():
        print(f"{name:28s} {v:24s} tok/s {r.get('tokens_per_s')} ms {r.get('step_ms_median')} "
              f"peak {r.get('peak_gib')} reserved {r.get('peak_reserved_gib')} graph {r.get('cuda_graph')}")
    tl = (d.get("profile") or {}).get("timeline") or {}
    if tl:
        print("   timeline", {k: tl.get(k) for k in ("span_ms", "busy_ms", "idle_ms", "idle_by_cause_ms", "n_gaps")})
PY
echo "== done $(date +%T)"
