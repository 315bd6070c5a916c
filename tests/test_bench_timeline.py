"""bench/e2e/timeline.py: a profiled step's compute-stream idle time, split by what overlapped it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "e2e"))

from timeline import Span, stream_gaps  # noqa: E402


def test_gaps_are_split_into_launch_copy_and_other():
    k = lambda a, b, corr, stream=7: Span("kernel", stream, a, b, f"k{corr}", corr)  # noqa: E731
    spans = [
        k(0, 10, 1),
        k(12, 20, 2),  # a 2 us boundary: busy
        k(30, 40, 3),  # 10 us while a copy runs on stream 9: waited on the copy
        Span("copy", 9, 19, 31, "Memcpy HtoD", 50),
        k(60, 70, 4),  # 20 us, launched by the host at 55, after the gap began at 40: the host was late
        Span("launch", 0, 55, 56, "cudaLaunchKernel", 4),
        Span("launch", 0, 25, 26, "cudaLaunchKernel", 5),
        k(80, 90, 5),  # 10 us, launched early, nothing else running: another wait
        k(0, 5, 6, stream=11),  # a less busy stream is not the compute stream
    ]
    out = stream_gaps(spans)
    assert out["compute_stream"] == 7
    assert out["span_ms"] == 0.09 and out["busy_ms"] == 0.048 and out["idle_ms"] == 0.042
    assert out["idle_by_cause_ms"] == {"launch": 0.02, "copy": 0.01, "other": 0.01}
    assert [g["cause"] for g in out["gaps"]] == ["launch", "copy", "other"]
    assert out["gaps"][1]["copy_ms"] == 0.01 and out["gaps"][0]["before"] == "k3" and out["gaps"][0]["after"] == "k4"
    assert out["copy_ms_by_stream"] == {"9": 0.012}
    assert stream_gaps([Span("copy", 9, 0, 1, "Memcpy", 1)]) == {}
