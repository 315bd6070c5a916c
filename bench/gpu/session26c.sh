#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~430 s with a fresh machine's model build; carry .whl/slim and
# .whl/anchors, WHEELS=.whl/slim exported BEFORE sourcing _env.sh; session26b.sh's var_packed JSON copied into
# bench/results/ first). Packed rows measured again with the replay (`bench_e2e --replay-warmup`, default for packed
# rows): in every packed call on record Unsloth's 2nd timed step (its first batch of 11 documents) took ~3x its median,
# and the 1.58-1.63x ratios reported since session 12 were by means with it in; by medians those calls read 1.29-1.36x
# (session 24: 1.584x by means, 1.298x by medians). Ours with the fastest finished variant of session26b.sh
# (best_variant.py; PACKED_FLAGS overrides; session 14's packed flags when none finished), Unsloth and standard QLoRA.
# Prediction: Unsloth 800-860 ms a step, no step over 1.3x its median; ours within 2% of its variant's median in 26b
# (575-625 ms for keep6 with kv shared and the longest bounded); 1.32-1.42x by means and by medians; the losses within 1e-2 of standard
# QLoRA's.
set -o pipefail
source bench/gpu/_env.sh
KEEP6="--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device --head-on-host \
--keep-mlp-layers 6 --cuda-graph"
F=${PACKED_FLAGS:-$(python3 bench/gpu/best_variant.py bench/results/var_packed_s26b_h200_*.json --default "$KEEP6")}
echo "== ours' flags: $F"
run_e2e e2e_s26c_packed 330 packed_8192 "$F" ours,unsloth,std_qlora
echo "== done $(date +%T)"
