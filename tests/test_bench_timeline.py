"""bench/e2e/timeline.py: a profiled step's compute-stream idle time, split by what overlapped it."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "e2e"))

from timeline import Span, dump_events, events_from_dump, stream_gaps  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


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
    assert out["idle_ms_by_gap_size"] == {
        "<5us": 0.002,
        "5-20us": 0.02,
        "20-100us": 0.02,
        "100-500us": 0.0,
        ">=500us": 0.0,
    }
    assert out["pairs"][0] == {"before": "k3", "after": "k4", "n": 1, "ms": 0.02}
    assert {(p["before"], p["after"]) for p in out["pairs"][1:]} == {("k2", "k3"), ("k4", "k5")}
    assert stream_gaps([Span("copy", 9, 0, 1, "Memcpy", 1)]) == {}


def _event(gpu, where, start_ns, dur_ns, name, corr, linked):
    """A kineto event with the accessors dump_events reads."""
    values = {
        "device_type": "DeviceType.CUDA" if gpu else "DeviceType.CPU",
        "device_resource_id": where,
        "start_thread_id": where,
        "start_ns": start_ns,
        "duration_ns": dur_ns,
        "name": name,
        "correlation_id": corr,
        "linked_correlation_id": linked,
    }
    return SimpleNamespace(**{key: (lambda v=v: v) for key, v in values.items()})


def test_a_dump_reads_back_as_the_profile_spans(tmp_path):
    # A kernel's own correlation id is its launch's; the linked one names the host op and must not be used.
    events = [
        _event(False, 3, 1_000, 500, "aten::mm", 0, 0),
        _event(False, 3, 50_000, 1_000, "cudaLaunchKernel", 11, 0),
        _event(True, 7, 0, 10_000, "gemm", 10, 0),
        _event(True, 7, 60_000, 10_000, "gemm", 11, 2),
        _event(True, 9, 0, 30_000, "Memcpy HtoD (Pinned -> Device)", 12, 0),
    ]
    prof = type(
        "P", (), {"profiler": type("K", (), {"kineto_results": type("R", (), {"events": lambda self: events})()})()}
    )
    path = str(tmp_path / "e.events.json.gz")
    assert dump_events(prof, path) == 5
    spans = events_from_dump(path)
    assert [s.kind for s in spans] == ["launch", "kernel", "kernel", "copy"]
    out = stream_gaps(spans)
    assert out["idle_by_cause_ms"] == {"launch": 0.05, "copy": 0.0, "other": 0.0}


def test_session9_eager_step_on_the_h200_is_gpu_bound():
    # The 4x2048 eager step profiled on the H200 in session 9 (bench/gpu/session9b.sh): 24.7 ms of 613 ms idle, a
    # third of it kernel boundaries under 5 us, and kernels launched after the stream went idle found (the first
    # timelines matched on the linked correlation id and reported no launch gap at all).
    out = stream_gaps(events_from_dump(str(RESULTS / "prof_eager_4x2048_s9b_h200_20261129.events.json.gz")))
    assert out["span_ms"] == 613.265 and out["busy_ms"] == 588.548 and out["idle_ms"] == 24.717
    assert out["idle_by_cause_ms"] == {"launch": 6.316, "copy": 8.182, "other": 1.38}
    assert out["idle_ms_by_gap_size"]["<5us"] == 8.838


def test_kernel_categories_of_a_recorded_profile():
    # session 8's 4x2048 profile (its 30 largest kernels), summed by kind
    import json

    from timeline import kernel_categories, kernel_category

    doc = json.loads((RESULTS / "profile_h200_20261129_s8.json").read_text())

    def find(o):
        if isinstance(o, dict):
            return o if "gpu_ms_total" in o else next((r for v in o.values() if (r := find(v))), None)
        return next((r for v in o if (r := find(v))), None) if isinstance(o, list) else None

    rows = [tuple(r) for r in find(doc)["top"]]
    cats = kernel_categories(rows)
    assert abs(sum(c["ms"] for c in cats.values()) - sum(r[1] for r in rows)) < 1e-6
    assert kernel_category("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT") == "gemm"
    assert kernel_category("nvjet_sm90_tst_16x128_64x11_1x2_h_bz_splitK_TNN") == "gemm_thin"
    assert (
        kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128") == "attention"
    )
    assert kernel_category("void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(void const*)") == "attention"
    assert kernel_category("_lora_swiglu_bwd_kernel") == "triton"
    assert kernel_category("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add>") == (
        "torch_elementwise"
    )
    # the GEMMs lead that step, the copies (on their own stream) next; the order is by time
    assert list(cats)[:2] == ["gemm", "copy"] and cats["gemm"]["top"][0][0].startswith("nvjet_sm90_tst_320x128")
    assert [c["ms"] for c in cats.values()] == sorted((c["ms"] for c in cats.values()), reverse=True)
