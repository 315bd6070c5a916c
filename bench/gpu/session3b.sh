#!/usr/bin/env bash
# Device call 2 of session 3 (~580 s): the max-context searches under the 80 GiB cap on 2-layer models that hold
# the other layers' resident memory as a measured ballast (--reduced-layers 2; session3a.sh checks the method),
# ours and Unsloth on Llama-3.1-8B shapes, ours on 70B shapes. Resumes the file session3a.sh wrote.
set -o pipefail
source bench/gpu/_env.sh
RES=bench/results/bigmodel_h200_s3.json
cp "$RES" /tmp/bigmodel.json 2>/dev/null
python3 bench/e2e/max_context.py --reduced-layers 2 --targets ${TARGETS:-ours_8b,unsloth_8b,ours_70b} --budget-s ${BUDGET:-560} \
  --resume-from /tmp/bigmodel.json --out /tmp/bigmodel.json 2>&1 | grep -vE "Failed to query|Warning|warn" | tail -40
cp /tmp/bigmodel.json "$OUT/bigmodel_s3.json"
echo "== done $(date +%T)"
