#!/usr/bin/env bash
# The test run of `make test` (and so of CI), once the set-up has installed VENV:
#
#   1. a side lane in the background: the tests that share nothing with the others, the two-node `ray job
#      submit` test (its own two-node cluster, much of its time spent waiting on it) and the 1M-example packing
#      memory test (one subprocess, one core);
#   2. the kernel tests under the Triton interpreter, also in the background (one process, one core), in the
#      idle CPU the Ray-bound main suite leaves (fresh-clone .ci/run: 1,203 s this way, 1,221 s with the kernel
#      tests first), then in the same lane two slow tests that need no Ray and run in subprocesses of their own
#      (the interpreted-Triton fidelity run and the export's peak-RSS check, ~90 s of the main suite's time);
#   3. everything else, with the session's one Ray cluster;
#   4. the two background lanes' results, then the GGUF test once the background llama-cpp-python build is in
#      (scripts/llama_cpp.sh).
#
# Every step runs even when one before it failed; the exit status is non-zero when any did.
#
#   scripts/run_tests.sh VENV
set -uo pipefail
venv=${1:?venv folder}
py=$venv/bin/python
pytest=("$py" -m pytest -q -p no:cacheprovider)
side_tests=(
  tests/test_cluster.py::test_job_submit_quickstart_on_two_nodes
  tests/packing/test_memory.py::test_peak_rss_flat_in_input_size
)
late_tests=(
  tests/models/test_fidelity.py::test_fidelity_interpreted_triton
  tests/export/test_memory.py::test_peak_rss_stays_near_one_shard
)
side_log=$venv/side-lane.log
kernel_log=$venv/kernel-lane.log
failed=()

"${pytest[@]}" --timeout=900 "${side_tests[@]}" > "$side_log" 2>&1 &
side=$!
(
  TRITON_INTERPRET=1 "${pytest[@]}" --timeout=900 tests/kernels
  k=$?
  "${pytest[@]}" --timeout=900 "${late_tests[@]}"
  exit $((k || $?))
) > "$kernel_log" 2>&1 &
kernels=$!
trap 'kill "$side" "$kernels" 2>/dev/null' EXIT

deselect=()
for t in "${side_tests[@]}" "${late_tests[@]}"; do deselect+=(--deselect "$t"); done
"${pytest[@]}" --timeout=1200 --durations=15 --ignore=tests/kernels --ignore=tests/export/test_gguf.py \
  "${deselect[@]}" tests || failed+=("main tests")

wait "$kernels" || failed+=("kernel tests, ${late_tests[*]}")
wait "$side" || failed+=("side lane (${side_tests[*]})")
trap - EXIT
echo "== kernel lane: tests/kernels, then ${late_tests[*]}"
tail -n 25 "$kernel_log"
echo "== side lane: ${side_tests[*]}"
tail -n 15 "$side_log"

if scripts/llama_cpp.sh finish "$venv"; then
  "${pytest[@]}" --timeout=600 tests/export/test_gguf.py || failed+=("GGUF test")
else
  failed+=("llama-cpp-python build")
fi

if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
