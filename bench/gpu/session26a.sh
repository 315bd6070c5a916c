#!/usr/bin/env bash
# Prepared in sessions 24 and 25, not run (~470 s with a fresh machine's model build; carry .whl/slim and .whl/anchors,
# WHEELS=.whl/slim exported BEFORE sourcing _env.sh). Packed rows measured again, now that bench_e2e replays every
# packed step once untimed before timing it (run_stack --replay-warmup): in every packed call on record Unsloth's 2nd
# timed step (its first batch of 11 documents) took ~3x its median, and the 1.58-1.63x ratios reported since session
# 12 were by means with it in; by medians those calls read 1.29-1.36x (session 24: 1.584x by means, 1.298x by medians).
# Ours (session 14's packed flags), Unsloth and standard QLoRA on packed rows with the replay. Since session 25 ours
# hands flash varlen the 8 kv heads unrepeated (FlashAttention does GQA itself): per layer 96 MiB less written by the
# repeat and read by the kernel, and 96 MiB less of the attention stash copied to host memory and back (385 -> 289 MiB
# a layer with the layer input, ~6 GB a step less over PCIe). Prediction: Unsloth 800-860 ms a step, no step over 1.3x
# its median; ours 585-625 ms (633 at session 24's code; 4x2048 at these flags ran 582 in session 17); 1.32-1.42x by
# means and medians; the replayed losses within 5e-4 of each stack's first pass (ours' attention backward is not
# deterministic); the losses within 1e-2 of standard QLoRA's.
# First the GPU tests of the packed path (shared kv against the dense mask, forward and gradients) and of the replay.
set -o pipefail
source bench/gpu/_env.sh
gpu_tests 90 gpu_tests_s26a.log tests/models/test_packing.py tests/test_bench_replay.py
run_e2e e2e_s26a_packed 330 packed_8192 "--stash-attention --dequantize-once --embeddings-on-host --last-layer-on-device \
--head-on-host --keep-mlp-layers 6 --cuda-graph" ours,unsloth,std_qlora
echo "== done $(date +%T)"
