#!/usr/bin/env bash
# Session 17, call 7 (~200 s; carry .whl/slim, WHEELS=.whl/slim exported BEFORE sourcing _env.sh). 1x65536 with the
# input embedding and the LM head back on the GPU (peak 19.78 + 1.96 GiB, under Unsloth's 22.64): the gather of
# 65,536 rows over PCIe (~10.7 ms at session 12's 48.8 GB/s) leaves the step, and the 1.96 GiB of host memory the
# tables held pays most of a 14th host-kept layer (3.5 GiB; 118.95 GiB by the count). Prediction: -35 to -50 ms
# against +hostkeep13 with the tables on the host (11,138.6 ms in call 4, 11,168.7 in call 5's e2e).
set -o pipefail
source bench/gpu/_env.sh
grep -E "MemTotal|MemAvailable" /proc/meminfo
FLAGS="--synthetic 8b --ckpt offload --stash-attention --dequantize-once --mlp-chunk-tokens 0"
( while sleep 2; do free -m | awk '/Mem:/{print $3}'; done > "$OUT/free_s17i.log" ) & S=$!
run_ours var_1x65536_s17i 170 $FLAGS --batch 1 --seq 65536 --warmup 1 --steps 2 \
  --variants "all+once+stash+lastdev+keep2+hostkeep14"
kill $S; echo "max used MiB: $(sort -n "$OUT/free_s17i.log" | tail -1)"
python3 - "$OUT/var_1x65536_s17i.json" <<'PY'
import json, sys
for name, v in json.load(open(sys.argv[1])).get("variants", {}).items():
    print(name, v.get("status"), v.get("step_ms_median"), v.get("step_ms_all"), v.get("peak_gib"), v.get("pinned_host_gib"), v.get("error"))
PY
echo "== done $(date +%T)"
