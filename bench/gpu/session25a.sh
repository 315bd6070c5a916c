#!/usr/bin/env bash
# Prepared in session 24, not run (~420 s with a fresh machine's model build; carry .whl/slim and .whl/anchors,
# WHEELS=.whl/slim exported BEFORE sourcing _env.sh). Packed rows measured again, now that bench_e2e replays every
# packed step once untimed before timing it (run_stack --replay-warmup): in every packed call on record Unsloth's 2nd
# timed step (its first batch of 11 documents) took ~3x its median, and the 1.58-1.63x ratios reported since session
# 12 were by means with it in; by medians those calls read 1.29-1.36x (session 24: 1.584x by means, 1.298x by medians).
# Ours (session 14's packed flags), Unsloth and standard QLoRA on packed rows with the replay. Prediction: Unsloth
# 800-860 ms a step, no step over 1.3x its median; ours 625-640 ms; 1.27-1.36x by means and medians; the replayed
# losses within 5e-4 of each stack's first pass (ours' attention backward is not deterministic).
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s25a_packed 330 packed_8192 "--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device \
--head-on-host --keep-mlp-layers 6 --cuda-graph" ours,unsloth,std_qlora
echo "== done $(date +%T)"
