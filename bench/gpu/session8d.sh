#!/usr/bin/env bash
# Device call 4 of session 8 (~420 s), issue 5: 1x65536 for ours and Unsloth in one call (call 3's budget ran out
# before Unsloth), resumed into the session's e2e file with call 3's ours-only 1x65536 entry dropped first.
set -o pipefail
source bench/gpu/_env.sh
python3 -c "
import json; d = json.load(open('bench/results/e2e_h200_20261129_s8.json')); d['runs'].pop('1x65536', None)
json.dump(d, open('/tmp/e2e_s8d.json', 'w'), indent=1)"
echo "== e2e 1x65536 $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 420 --resume-from /tmp/e2e_s8d.json --shapes 1x65536 --stacks ours,unsloth \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once --mlp-chunk-tokens 0" --out /tmp/e2e_s8d.json 2>&1 \
  | grep -v "Failed to query" | tail -12
cp /tmp/e2e_s8d.json "$OUT/e2e_s8d.json"
echo "== done $(date +%T)"
