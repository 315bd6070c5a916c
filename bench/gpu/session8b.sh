#!/usr/bin/env bash
# Device call 2 of session 8 (~560 s), issue 5: GPU tests of the packed-row CUDA graph and of the offload copies
# without record_stream (attention_stash.release_copied), the recorded step's memory at 1x2048 and 4x2048 after
# that change, the e2e protocol at 1x2048 for all four stacks with ours recording its step (--cuda-graph), then the
# quickstart trainer on the GPU with and without train.cuda_graph.
set -o pipefail
source bench/gpu/_env.sh
echo "== gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_graphs.py tests/models/test_checkpointing.py \
  tests/models/test_attention_stash.py --timeout=120 -rf 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -12 \
  | tee "$OUT/gpu_tests_s8b.log"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rope.py --timeout=90 -rf 2>&1 \
  | grep -E "passed|failed|FAILED|Error" | tail -6 | tee -a "$OUT/gpu_tests_s8b.log"
run_ours v8b_1x2048_s8b 80 --synthetic 8b --batch 1 --seq 2048 --ckpt offload --warmup 3 --steps 8 \
  --variants all+offload+once+stash,all+offload+once+stash+graph,all+on+once+graph
run_ours v8b_4x2048_s8b 80 --synthetic 8b --batch 4 --seq 2048 --ckpt offload --warmup 2 --steps 6 \
  --variants all+offload+once+stash,all+offload+once+stash+graph
echo "== e2e $(date +%T)"
python3 bench/e2e/bench_e2e.py --budget-s 220 --shapes 1x2048 --stacks ours,unsloth,std_qlora,liger \
  --ckpt-ours offload --ours-flags "--stash-attention --dequantize-once --cuda-graph" --out /tmp/e2e_s8b.json 2>&1 \
  | grep -v "Failed to query" | tail -14
cp /tmp/e2e_s8b.json "$OUT/e2e_s8b.json" 2>/dev/null
for g in false true; do
  echo "== quickstart cuda_graph=$g $(date +%T)"
  timeout 75 python3 -m raytune_llm train conf/quickstart.yaml train.num_workers=1 output_dir=/tmp/runs name=qs_$g \
    train.cuda_graph=$g export.formats=[adapter] 2>&1 | grep -v "Failed to query" \
    | grep -E "exact|tokens|Error|error|wall" | tail -6
  cp /tmp/runs/qs_$g/summary.json "$OUT/quickstart_graph_${g}_summary.json" 2>/dev/null
  cp /tmp/runs/qs_$g/metrics.jsonl "$OUT/quickstart_graph_${g}_metrics.jsonl" 2>/dev/null
done
echo "== done $(date +%T)"
