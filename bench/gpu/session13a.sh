#!/usr/bin/env bash
# Prepared in session 12, not run (~290 s; carry .whl/core): where the 4x2048 step's time goes with session 12's settings
# (host embedding, 3 kept MLP layers; eager, since a graph replay cannot be profiled: session 9), and what is live at its
# peak, for the next lever against the 25 ms (4.2%) that 1.3x Unsloth still needs there.
set -o pipefail
source bench/gpu/_env.sh
# GPU tests edited after session 12's last call: the host table moved back and forth, a strided host table.
timeout 90 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/models/test_memory_settings.py \
  tests/kernels/test_embedding.py --timeout=80 -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6 \
  | tee "$OUT/gpu_tests_s13a.log"
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --embeddings-on-host --keep-mlp-layers 3"
run_ours prof_4x2048_s13a 110 $FLAGS --warmup 2 --steps 4 --profile
run_ours mem_4x2048_s13a 70 $FLAGS --warmup 2 --steps 2 --memory-snapshot
python3 - "$OUT" <<'PY'
import json, sys
d = json.load(open(f"{sys.argv[1]}/prof_4x2048_s13a.json"))
print("4x2048", d.get("tokens_per_s"), d.get("step_ms_median"), d.get("peak_gib"))
for k, ms, n in d.get("profile", {}).get("top", [])[:20]:
    print(f"   {ms:9.2f} ms {n:5d}  {k[:80]}")
m = json.load(open(f"{sys.argv[1]}/mem_4x2048_s13a.json")).get("memory_at_peak", {})
for site, mib, n in m.get("live_at_peak_mib", [])[:12]:
    print(f"   {mib:8.1f} MiB x{n:<4d} {site[:100]}")
PY
echo "== done $(date +%T)"
