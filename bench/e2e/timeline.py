"""Where a profiled step's compute stream stands idle, and what was going on meanwhile.

Session 8's 4x2048 profile summed 572 ms of compute kernels in a 635 ms step: ~63 ms with no kernel running on
the compute stream, which a CUDA graph (no launch gaps) did not remove. `stream_gaps` splits such idle time by
what overlapped it, from the profiler's own events (`events_from_profile`):

- ``launch``: the kernel after the gap was launched by the host after the gap began (the GPU waited for Python);
- ``copy``: otherwise, while a copy ran on another stream (the compute stream waited on a copy's event);
- ``other``: neither (an event wait with nothing running, a synchronize, an allocator call).

Usage: ``run_stack.py --profile`` stores the result under ``profile.timeline`` and every event beside it
(``dump_events``); ``python bench/e2e/timeline.py FILE.events.json.gz`` reads such a dump again. The profiler
records host activity too (for the launch calls), which slows the host: ``launch`` time there is an upper bound on
what the unprofiled step loses to the host (a CUDA graph, which takes the host out, is the check).

A GPU event's own correlation id is the one its host launch call carries; its "linked" correlation id names
something else (the host op). Session 9's first timelines matched on the linked one, found no launch for any
kernel and so reported ``launch`` as 0 everywhere.
"""

from __future__ import annotations

import gzip
import json
import re
from typing import NamedTuple


class Span(NamedTuple):
    """One event: ``kind`` "kernel", "copy" (GPU, on ``stream``) or "launch" (the host call of GPU event ``corr``)."""

    kind: str
    stream: int
    start_us: float
    end_us: float
    name: str
    corr: int


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(a: float, b: float, spans: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in spans)


# Idle time by the length of the gap it lies in: kernel boundaries (< 5 us) apart from real waits.
_SIZES = [("<5us", 5.0), ("5-20us", 20.0), ("20-100us", 100.0), ("100-500us", 500.0), (">=500us", float("inf"))]


def stream_gaps(spans: list[Span], min_gap_us: float = 5.0, top: int = 12) -> dict:
    """Idle time of the busiest kernel stream between its first and last kernel, by cause (see module docstring).

    Args:
        spans: the step's events.
        min_gap_us: shorter gaps (kernel boundaries) count in ``idle_ms`` but in no cause and no gap entry.
        top: how many of the longest gaps to list.

    Returns:
        ``{"compute_stream", "span_ms", "busy_ms", "idle_ms", "idle_by_cause_ms": {launch, copy, other},
        "copy_ms_by_stream", "n_gaps", "idle_ms_by_gap_size", "gaps": [{start_ms, ms, cause, copy_ms, before,
        after}] (the longest), "pairs": [{before, after, n, ms}] (kernel pairs with the most idle between them)}``
        (times from the first kernel); an empty dict without kernels.
    """
    kernels = [s for s in spans if s.kind == "kernel"]
    if not kernels:
        return {}
    per_stream: dict[int, float] = {}
    for k in kernels:
        per_stream[k.stream] = per_stream.get(k.stream, 0.0) + k.end_us - k.start_us
    compute = max(per_stream, key=per_stream.get)
    mine = sorted((k for k in kernels if k.stream == compute), key=lambda k: k.start_us)
    t0, t1 = mine[0].start_us, max(k.end_us for k in mine)
    copies = _union([(s.start_us, s.end_us) for s in spans if s.kind == "copy" and s.stream != compute])
    copy_by_stream: dict[int, float] = {}
    for s in spans:
        if s.kind == "copy":
            copy_by_stream[s.stream] = copy_by_stream.get(s.stream, 0.0) + s.end_us - s.start_us
    launched = {s.corr: s.start_us for s in spans if s.kind == "launch"}
    causes = {"launch": 0.0, "copy": 0.0, "other": 0.0}
    sizes = {label: 0.0 for label, _ in _SIZES}
    pairs: dict[tuple[str, str], list[float]] = {}
    gaps = []
    end = mine[0].end_us
    prev = mine[0]
    for k in mine[1:]:
        gap = k.start_us - end
        if gap > 0:
            sizes[next(label for label, below in _SIZES if gap < below)] += gap
        if gap >= min_gap_us:
            copy_us = _overlap(end, k.start_us, copies)
            host = launched.get(k.corr)
            if host is not None and host > end:
                cause = "launch"
            elif copy_us > 0.5 * gap:
                cause = "copy"
            else:
                cause = "other"
            causes[cause] += gap
            pair = pairs.setdefault((prev.name[:60], k.name[:60]), [0, 0.0])
            pair[0] += 1
            pair[1] += gap
            gaps.append(
                {
                    "start_ms": round((end - t0) / 1e3, 3),
                    "ms": round(gap / 1e3, 3),
                    "cause": cause,
                    "copy_ms": round(copy_us / 1e3, 3),
                    "before": prev.name[:80],
                    "after": k.name[:80],
                }
            )
        if k.end_us > end:
            end, prev = k.end_us, k
    busy = sum(b - a for a, b in _union([(k.start_us, k.end_us) for k in mine]))
    gaps.sort(key=lambda g: -g["ms"])
    return {
        "compute_stream": compute,
        "span_ms": round((t1 - t0) / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "idle_ms": round((t1 - t0 - busy) / 1e3, 3),
        "idle_by_cause_ms": {c: round(v / 1e3, 3) for c, v in causes.items()},
        "copy_ms_by_stream": {str(s): round(v / 1e3, 3) for s, v in copy_by_stream.items()},
        "n_gaps": len(gaps),
        "idle_ms_by_gap_size": {label: round(v / 1e3, 3) for label, v in sizes.items()},
        "gaps": gaps[:top],
        "pairs": [
            {"before": b, "after": a, "n": n, "ms": round(us / 1e3, 3)}
            for (b, a), (n, us) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]
        ],
    }


_LAUNCHES = ("cudaLaunch", "cuLaunch", "cudaMemcpy", "cudaMemset", "cudaGraphLaunch")


def _span(on_gpu: bool, where: int, start_us: float, dur_us: float, name: str, corr: int) -> Span | None:
    if on_gpu:
        kind = "copy" if name.startswith(("Memcpy", "Memset")) else "kernel"
    elif name.startswith(_LAUNCHES):
        kind = "launch"
    else:
        return None
    return Span(kind, where, start_us, start_us + dur_us, name, corr)


def events_from_profile(prof) -> list[Span]:
    """The GPU kernels and copies of a `torch.profiler.profile` run, and the host calls that launched them."""
    spans = []
    for e in prof.profiler.kineto_results.events():
        on_gpu = str(e.device_type()).endswith("CUDA")
        span = _span(
            on_gpu,
            int(e.device_resource_id()),
            e.start_ns() / 1e3,
            e.duration_ns() / 1e3,
            e.name(),
            int(e.correlation_id()),
        )
        if span is not None:
            spans.append(span)
    return spans


def events_from_dump(path: str) -> list[Span]:
    """The spans of a `dump_events` file (what `events_from_profile` gives for the run it was written from)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    names = data["names"]
    spans = []
    for dev, where, start, dur, idx, corr, _linked in data["rows"]:
        span = _span(dev == "cuda", where, start, dur, names[idx], corr)
        if span is not None:
            spans.append(span)
    return spans


_GEMM_TILE = re.compile(r"(?:nvjet|cutlass|sm90|sm80)\w*?_(\d+)x(\d+)_")


def kernel_category(name: str) -> str:
    """What a profiled kernel is, by its name: ``attention`` (cuDNN / flash SDPA), ``gemm`` (cuBLAS, a tile of at
    least 64 both ways), ``gemm_thin`` (a smaller tile: the rank-16 adapters' products, split-K pieces),
    ``triton`` (ours: ``_name_kernel``), ``torch_elementwise`` (``at::native``), ``copy`` (memcpy / memset on the
    copy engines, which overlap the compute stream) or ``other``."""
    low = name.lower()
    if low.startswith(("memcpy", "memset")):
        return "copy"
    if any(k in low for k in ("sdpa", "fmha", "flash", "attention")) or "cudnn" in low:
        return "attention"
    tile = _GEMM_TILE.search(low)
    if tile or "gemm" in low or "cublas" in low:
        return "gemm_thin" if tile and min(int(tile[1]), int(tile[2])) < 64 else "gemm"
    if name.startswith("_") and name.endswith("_kernel"):
        return "triton"
    if "at::native" in name:
        return "torch_elementwise"
    return "other"


def kernel_categories(rows: list[tuple[str, float, int]]) -> dict[str, dict]:
    """``rows`` of (kernel name, GPU ms, count) summed by `kernel_category`, largest first: ``{category: {"ms",
    "count", "top": [(name, ms), ...3]}}``."""
    out: dict[str, dict] = {}
    for name, ms, count in rows:
        c = out.setdefault(kernel_category(name), {"ms": 0.0, "count": 0, "top": []})
        c["ms"] += ms
        c["count"] += count
        c["top"].append((name[:120], round(ms, 3)))
    for c in out.values():
        c["ms"] = round(c["ms"], 3)
        c["top"] = sorted(c["top"], key=lambda t: -t[1])[:3]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def dump_events(prof, path: str) -> int:
    """Every event of a `torch.profiler.profile` run (host and GPU) as gzipped JSON rows, for study off the machine.

    Row: ``[device ("cpu" | "cuda"), stream or thread, start_us, duration_us, name index, correlation id, linked
    correlation id]``; names in ``"names"``. Returns the number of rows.
    """
    names: dict[str, int] = {}
    rows = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        idx = names.setdefault(name, len(names))
        dev = "cuda" if str(e.device_type()).endswith("CUDA") else "cpu"
        where = int(e.device_resource_id()) if dev == "cuda" else int(e.start_thread_id())
        rows.append(
            [
                dev,
                where,
                round(e.start_ns() / 1e3, 3),
                round(e.duration_ns() / 1e3, 3),
                idx,
                int(e.correlation_id()),
                int(e.linked_correlation_id()),
            ]
        )
    with gzip.open(path, "wt") as f:
        json.dump({"names": list(names), "rows": rows}, f)
    return len(rows)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit("usage: python bench/e2e/timeline.py FILE.events.json.gz (a run_stack --profile dump)")
    print(json.dumps(stream_gaps(events_from_dump(sys.argv[1])), indent=1))
