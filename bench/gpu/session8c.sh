#!/usr/bin/env bash
# Device call 3 of session 8 (~540 s), issue 5: Liger at 1x2048 (skipped by call 2's budget) and a same-call 1x65536
# for ours and Unsloth, resumed into call 2's e2e file; then the quickstart trainer on the GPU with and without
# train.cuda_graph (the trainer's recorded step on packed rows).
set -o pipefail
source bench/gpu/_env.sh
cp bench/results/e2e_h200_20261129_s8.json /tmp/e2e_s8c.json
echo "== e2e 1x2048 liger $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 120 --resume-from /tmp/e2e_s8c.json --shapes 1x2048 --stacks liger \
  --out /tmp/e2e_s8c.json 2>&1 | grep -v "Failed to query" | grep -E "^1x2048|wrote|Error" | tail -6
cp /tmp/e2e_s8c.json "$OUT/e2e_s8c.json"
echo "== e2e 1x65536 $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 230 --resume-from /tmp/e2e_s8c.json --shapes 1x65536 --stacks ours,unsloth \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once --mlp-chunk-tokens 0" --out /tmp/e2e_s8c.json 2>&1 \
  | grep -v "Failed to query" | tail -12
cp /tmp/e2e_s8c.json "$OUT/e2e_s8c.json"
for g in false true; do
  echo "== quickstart cuda_graph=$g $(date +%T)"
  timeout 110 python3 -m raytune_llm train conf/quickstart.yaml train.num_workers=1 output_dir=/tmp/runs name=qs_$g \
    train.cuda_graph=$g export.formats=[adapter] 2>&1 | grep -v "Failed to query" \
    | grep -E "exact|step 150|Error|error|wall" | tail -5
  cp /tmp/runs/qs_$g/summary.json "$OUT/quickstart_graph_${g}_summary.json" 2>/dev/null
  cp /tmp/runs/qs_$g/metrics.jsonl "$OUT/quickstart_graph_${g}_metrics.jsonl" 2>/dev/null
done
echo "== done $(date +%T)"
