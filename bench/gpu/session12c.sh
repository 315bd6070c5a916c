#!/usr/bin/env bash
# Prepared in session 10 (as session11a.sh), not run yet: 1x65536 for ours and Unsloth in one call with the current code (session
# 10 ran ours alone: 5,652 tokens/s; Unsloth's 4,527 is session 8's, another machine). ~430 s; carry .whl/core and
# .whl/anchors.
set -o pipefail
source bench/gpu/_env.sh
run_e2e e2e_s12a "${BUDGET:-540}" 1x65536 "--stash-attention --dequantize-once --mlp-chunk-tokens 0"
echo "== done $(date +%T)"
