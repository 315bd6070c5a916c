"""Shared measuring harness for the kernel benchmarks (``bench/kernels/bench_*.py``).

What it measures, per (kernel, shape, provider, mode):

- time: median (and 20th / 80th percentiles) of many repetitions, each bracketed by its own pair
  of CUDA events; a per-repetition ``setup`` (fresh inputs, ``.grad = None``, an L2 flush) runs
  outside the events, as ``triton.testing.do_bench`` does. Before the start event the stream is
  given ~2 ms of GPU spin (``torch.cuda._sleep``), so the CPU has queued the whole operation by the
  time the GPU reaches it: ``ms`` is the device time, as in a training step where the GPU runs
  ahead of Python. Without that pre-roll an idle GPU waits at the start event for Python's launch
  (autograd, argument checks), which dominated the sub-0.1 ms kernels of session 1 (RMSNorm
  backward: 0.35 ms measured for ~0.05 ms of traffic). That older figure is kept as
  ``extra["ms_launch"]``: the same repetitions timed from an idle GPU;
- peak memory: ``torch.cuda.max_memory_allocated`` over one extra run, reset after setup, so it
  is the peak of the operation with its inputs alive (the same convention as Liger's benchmarks),
  plus ``peak_extra_mib``, the same minus what was allocated before the run (inputs, cached sources);
- bandwidth: the minimum bytes the operation must move divided by its time, and that as a fraction
  of the device copy bandwidth measured once per harness (``dst.copy_(src)`` of 1 GiB, 2x bytes).

Modes: ``forward`` (forward with inputs that require grad, as in training), ``backward`` (only
the backward, the forward runs in setup), ``full`` (forward + backward).

``--tiny`` (CPU): tiny shapes, eager providers only (no ``torch.compile``), wall-clock timing
with ``time.perf_counter`` instead of CUDA events, no peak memory; it proves the scripts end to
end before GPU time is spent. Our Triton kernels run in the tiny lane only when
``TRITON_INTERPRET=1`` is set (otherwise the functionals would silently run the reference, so the
"ours" provider is skipped with a reason).

API for a bench module ``bench/kernels/bench_<op>.py`` (``run_all.py`` imports every one)::

    NAME = "rms_norm"                      # key in the JSON summary
    GOALS = {"bandwidth_fraction": ">= 0.75", "speedup_vs_liger": ">= 1.0"}   # stated beside figures
    BANDWIDTH_BOUND = True                 # False: bandwidth_fraction is null in the summary

    def run(h: Harness) -> list[Record]:
        shapes = [...tiny...] if h.tiny else [...real...]
        records = []
        for label, dims in shapes:
            def make_inputs():             # fresh tensors every call (called in setup, untimed)
                x = torch.randn(..., device=h.device, dtype=h.dtype, requires_grad=True)
                return (x, w, eps)
            providers = {
                "torch": reference.rms_norm,
                "torch_compile": h.compile(reference.rms_norm),     # None in --tiny
                "liger": h.liger(lambda: <import liger, return a callable>),   # None when absent
                "ours": h.ours(rms_norm),                             # None when it would not run Triton
            }
            records += h.bench_case(NAME, label, make_inputs, providers,
                                    bytes_moved={"forward": ..., "backward": ..., "full": ...},
                                    headline=(label == shapes[-1][0]))
        return records

    if __name__ == "__main__":
        main_single(NAME, run, GOALS, BANDWIDTH_BOUND)    # python bench/kernels/bench_<op>.py [--tiny]

A provider is a callable taking the tuple ``make_inputs()`` returned and returning a tensor or a
tuple of tensors; backward sends fixed random upstream gradients (ones for a scalar) into every
floating output. ``summarize(records, ...)`` turns the headline shape's ``full`` mode into
``{"speedup_vs_liger", "speedup_vs_torch", "bandwidth_fraction", "peak_mib_ours",
"peak_mib_liger", "goals"}`` (null where not measured or not applicable).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Harness", "Record", "Timing", "environment", "main_single", "print_table", "summarize", "write_results"]

MODES = ("forward", "backward", "full")
# 256 MiB flush buffer: larger than the H200's 50 MiB L2 by 5x, the size triton.testing.do_bench uses.
_FLUSH_BYTES = 256 * 1024 * 1024
_PREROLL_MS = 2.0  # GPU spin before each timed repetition (see the module docstring)


@dataclass
class Timing:
    """One measured callable: milliseconds (median, p20, p80) and peak MiB (None on CPU)."""

    ms: float
    ms_p20: float
    ms_p80: float
    peak_mib: float | None
    peak_extra_mib: float | None = None
    ms_launch: float | None = None


@dataclass
class Record:
    """One row of results: a kernel at one shape, through one provider, in one mode."""

    kernel: str
    shape: str
    provider: str
    mode: str
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    peak_mib: float | None = None
    peak_extra_mib: float | None = None
    gbps: float | None = None
    bandwidth_fraction: float | None = None
    headline: bool = False
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict[str, Any]:
    """Describe where the numbers were taken.

    Returns:
        GPU name (or ``"cpu"``), torch / triton / transformers / liger-kernel versions, CUDA version,
        git commit, UTC date and time, and whether ``TRITON_INTERPRET`` was set.
    """
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }


def _floating(out: Any) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]


class Harness:
    """Times callables and records results; one per benchmark run.

    Args:
        tiny: CPU lane (tiny shapes, wall clock, eager only).
        dtype: activation dtype for the benches (bf16 on GPU; fp32 in tiny mode, CPU bf16 is slow).
        reps: timed repetitions per measurement (median taken).
        warmup: untimed repetitions first (compilation, autotuning, allocator warm-up).

    Raises:
        RuntimeError: when not ``tiny`` and no CUDA device is present.
    """

    def __init__(self, tiny: bool = False, dtype: torch.dtype | None = None, reps: int = 50, warmup: int = 5):
        if not tiny and not torch.cuda.is_available():
            raise RuntimeError("the kernel benchmarks need a CUDA GPU; use --tiny for the CPU smoke run")
        self.tiny = tiny
        self.device = torch.device("cpu") if tiny else torch.device("cuda")
        self.dtype = dtype or (torch.float32 if tiny else torch.bfloat16)
        self.reps = 3 if tiny else reps
        self.warmup = 1 if tiny else warmup
        self._flush = None if tiny else torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=self.device)
        self._spin_cycles = 0 if tiny else self._calibrate_spin(_PREROLL_MS)
        self.copy_gbps = self._copy_bandwidth()

    # ---- providers -------------------------------------------------------------------------------

    def compile(self, fn: Callable) -> Callable | None:
        """``torch.compile(fn)`` on the GPU; None in the tiny lane (compiling on 2 CPU cores costs minutes)."""
        return None if self.tiny else torch.compile(fn)

    def liger(self, factory: Callable[[], Callable]) -> Callable | None:
        """Liger-Kernel's provider from ``factory()``, or None when liger_kernel is absent or cannot run here."""
        if self.tiny:
            return None  # Liger's kernels need a GPU; the tiny lane has none.
        try:
            return factory()
        except ImportError:
            return None

    def ours(self, fn: Callable) -> Callable | None:
        """Our functional, or None when it would dispatch to the reference (CPU without TRITON_INTERPRET=1)."""
        if self.tiny and os.environ.get("TRITON_INTERPRET") != "1":
            return None
        return fn

    # ---- timing ----------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn: Callable[[Any], Any], setup: Callable[[], Any] | None = None) -> Timing:
        """Median time of ``fn(setup())`` over ``reps`` runs, plus the peak memory of one run.

        Args:
            fn: the timed callable; receives whatever ``setup`` returned (None without setup).
            setup: untimed preparation run before every repetition.

        Returns:
            A :class:`Timing`.
        """
        setup = setup or (lambda: None)
        for _ in range(self.warmup):
            fn(setup())
        self._sync()
        times: list[float] = []
        launch_ms = None
        if self.device.type == "cuda":
            times = self._events(fn, setup, preroll=True)
            launch_ms = statistics.median(self._events(fn, setup, preroll=False))
            state = setup()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(state)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            extra = peak - before / 2**20
        else:
            for _ in range(self.reps):
                state = setup()
                t0 = time.perf_counter()
                fn(state)
                times.append((time.perf_counter() - t0) * 1e3)
            peak = extra = None
        qs = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
        return Timing(
            ms=statistics.median(times),
            ms_p20=qs[0],
            ms_p80=qs[3],
            peak_mib=peak,
            peak_extra_mib=extra,
            ms_launch=launch_ms,
        )

    def _events(self, fn: Callable[[Any], Any], setup: Callable[[], Any], preroll: bool) -> list[float]:
        """Milliseconds of ``fn(setup())`` per repetition between CUDA events (see the module docstring)."""
        events = []
        for _ in range(self.reps):
            state = setup()
            self._flush.zero_()
            if preroll:
                torch.cuda._sleep(self._spin_cycles)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            events.append((start, end))
            if preroll:
                torch.cuda.synchronize()  # the next pre-roll must start from an idle queue, not pile up
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    def _calibrate_spin(self, ms: float) -> int:
        """Cycles of ``torch.cuda._sleep`` that keep the GPU busy for about ``ms`` milliseconds."""
        cycles = 1_000_000
        torch.cuda._sleep(cycles)  # first call loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return int(cycles * ms / max(start.elapsed_time(end), 1e-3))

    def _copy_bandwidth(self) -> float:
        """Device copy bandwidth in GB/s (read + write counted), measured once."""
        n = (64 if self.tiny else 1024) * 2**20
        src = torch.empty(n, dtype=torch.int8, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        t = self.time(lambda _: dst.copy_(src))

        return 2 * n / (t.ms * 1e-3) / 1e9

    def bench_case(
        self,
        kernel: str,
        shape: str,
        make_inputs: Callable[[], tuple],
        providers: dict[str, Callable | None],
        bytes_moved: dict[str, int] | None = None,
        modes: Sequence[str] = MODES,
        headline: bool = False,
    ) -> list[Record]:
        """Measure every provider in every mode at one shape.

        Args:
            kernel: kernel name (the bench module's ``NAME``).
            shape: a short label for the shape, e.g. ``"4096x8192"``.
            make_inputs: returns a fresh tuple of inputs each call (untimed).
            providers: name -> callable(inputs) or None (recorded as skipped).
            bytes_moved: minimum bytes per mode, for the bandwidth figures; omit for compute-bound ops.
            modes: subset of ``("forward", "backward", "full")``.
            headline: mark these records as the shape the summary is taken from.

        Returns:
            One :class:`Record` per provider and mode.
        """
        records = []
        grads: dict[tuple, torch.Tensor] = {}

        def upstream(outs: list[torch.Tensor]) -> list[torch.Tensor]:
            res = []
            for o in outs:
                key = (tuple(o.shape), o.dtype)
                if key not in grads:
                    grads[key] = torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o)
                res.append(grads[key])
            return res

        for pname, fn in providers.items():
            for mode in modes:
                rec = Record(kernel=kernel, shape=shape, provider=pname, mode=mode, headline=headline)
                records.append(rec)
                if fn is None:
                    rec.skipped = "tiny lane (eager only)" if self.tiny else "not available (liger_kernel absent?)"
                    continue
                try:
                    timing = self._time_mode(fn, make_inputs, mode, upstream)
                except Exception as exc:  # one provider failing (e.g. OOM) must not lose the others' rows
                    rec.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                rec.ms, rec.ms_p20, rec.ms_p80 = timing.ms, timing.ms_p20, timing.ms_p80
                rec.peak_mib, rec.peak_extra_mib = timing.peak_mib, timing.peak_extra_mib
                if timing.ms_launch is not None:
                    rec.extra["ms_launch"] = timing.ms_launch
                if bytes_moved and mode in bytes_moved:
                    rec.gbps = bytes_moved[mode] / (timing.ms * 1e-3) / 1e9
                    rec.bandwidth_fraction = rec.gbps / self.copy_gbps
        return records

    def _time_mode(self, fn: Callable, make_inputs: Callable, mode: str, upstream: Callable) -> Timing:
        def clear(args: tuple) -> tuple:
            for a in args:
                if isinstance(a, torch.Tensor):
                    a.grad = None
            return args

        if mode == "forward":
            return self.time(lambda args: fn(*args), lambda: clear(make_inputs()))
        if mode == "backward":

            def setup_bwd():
                args = clear(make_inputs())
                outs = _floating(fn(*args))
                return outs, upstream(outs)

            return self.time(lambda st: torch.autograd.backward(st[0], st[1]), setup_bwd)
        if mode == "full":

            def full(args):
                outs = _floating(fn(*args))
                torch.autograd.backward(outs, upstream(outs))

            return self.time(full, lambda: clear(make_inputs()))
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def summarize(records: list[Record], goals: dict[str, str], bandwidth_bound: bool = True) -> dict[str, Any]:
    """Summary of one kernel from its headline shape in ``full`` mode.

    Args:
        records: the kernel's records.
        goals: stated goals, copied beside the figures.
        bandwidth_bound: False for compute-bound kernels (bandwidth_fraction is then null).

    Returns:
        ``{"shape", "speedup_vs_liger", "speedup_vs_torch", "bandwidth_fraction", "peak_mib_ours",
        "peak_mib_liger", "peak_mib_torch", "goals"}`` with None where a figure is missing.
    """
    head = [r for r in records if r.headline and r.mode == "full" and r.ms is not None]
    by = {r.provider: r for r in head}
    ours = by.get("ours")

    def speedup(other: str, launch: bool = False) -> float | None:
        o = by.get(other)
        if ours is None or o is None:
            return None
        if launch:
            a, b = o.extra.get("ms_launch"), ours.extra.get("ms_launch")
            return None if a is None or b is None else round(a / b, 3)
        return round(o.ms / ours.ms, 3)

    def peak(p: str, attr: str = "peak_mib") -> float | None:
        r = by.get(p)
        v = None if r is None else getattr(r, attr)
        return None if v is None else round(v, 1)

    frac = ours.bandwidth_fraction if (ours is not None and bandwidth_bound) else None
    return {
        "shape": head[0].shape if head else None,
        "speedup_vs_liger": speedup("liger"),
        "speedup_vs_torch": speedup("torch"),
        "speedup_vs_liger_launch_included": speedup("liger", launch=True),
        "bandwidth_fraction": None if frac is None else round(frac, 3),
        "peak_mib_ours": peak("ours"),
        "peak_mib_liger": peak("liger"),
        "peak_mib_torch": peak("torch"),
        "peak_extra_mib_ours": peak("ours", "peak_extra_mib"),
        "peak_extra_mib_liger": peak("liger", "peak_extra_mib"),
        "goals": goals,
    }


def print_table(records: list[Record], copy_gbps: float | None = None) -> None:
    """Print the records as an aligned text table (one line per kernel, shape, mode and provider)."""
    if copy_gbps:
        print(f"device copy bandwidth: {copy_gbps:,.0f} GB/s")
    head = (
        f"{'kernel':<26} {'shape':<30} {'mode':<8} {'provider':<14} {'ms':>9} {'peak MiB':>10} {'+MiB':>9}"
        f" {'GB/s':>8} {'bw%':>6} {'ms+launch':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in records:
        if r.skipped:
            print(f"{r.kernel:<26} {r.shape:<30} {r.mode:<8} {r.provider:<14} skipped: {r.skipped}")
            continue
        peak = f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "-"
        extra = f"{r.peak_extra_mib:,.0f}" if r.peak_extra_mib is not None else "-"
        gbps = f"{r.gbps:,.0f}" if r.gbps is not None else "-"
        frac = f"{100 * r.bandwidth_fraction:.0f}" if r.bandwidth_fraction is not None else "-"
        launch = f"{r.extra['ms_launch']:.3f}" if r.extra.get("ms_launch") is not None else "-"
        print(
            f"{r.kernel:<26} {r.shape:<30} {r.mode:<8} {r.provider:<14} {r.ms:>9.3f} {peak:>10} {extra:>9}"
            f" {gbps:>8} {frac:>6} {launch:>10}"
        )


def gpu_slug(env: dict[str, Any]) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``; ``"cpu"`` stays ``"cpu"``."""
    name = env["gpu"].lower().replace("nvidia", "").strip()
    return "-".join(name.split()) or "gpu"


def write_results(
    bench: str,
    records: list[Record],
    summary: dict[str, Any],
    h: Harness,
    out: Path | None = None,
    merge: bool = False,
) -> Path:
    """Write ``bench/results/<bench>_<gpu>_<yyyymmdd>.json`` (or ``out``) and return its path.

    Args:
        bench: the result family, e.g. ``"kernels"``.
        records: every record measured.
        summary: per kernel name, the dict from :func:`summarize`.
        h: the harness (for the copy bandwidth and mode).
        out: explicit output path.
        merge: keep the kernels of an existing file of the same name that this run did not measure
            (so ``--only a`` then ``--only b`` build one file, each call under the device's time limit).

    Returns:
        The path written.
    """
    env = environment()
    if out is None:
        day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
        suffix = "_tiny" if h.tiny else ""
        out = Path(__file__).parent / "results" / f"{bench}_{gpu_slug(env)}_{day}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if merge and out.exists():
        old = json.loads(out.read_text())
        if old.get("tiny") == h.tiny:
            summary = {**{k: v for k, v in old.get("summary", {}).items() if k not in summary}, **summary}
            kept = [Record(**r) for r in old.get("records", []) if r["kernel"] not in {r2.kernel for r2 in records}]
            records = kept + records
    doc = {
        "summary": summary,
        "environment": env,
        "tiny": h.tiny,
        "dtype": str(h.dtype).replace("torch.", ""),
        "copy_gbps": round(h.copy_gbps, 1),
        "reps": h.reps,
        "records": [asdict(r) for r in records],
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments shared by run_all.py and each bench module run alone."""
    p = argparse.ArgumentParser(description="kernel benchmarks")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, eager only, wall clock")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement (median taken)")
    p.add_argument("--out", type=Path, default=None, help="output JSON path (default bench/results/...)")
    p.add_argument("--only", nargs="*", default=None, help="kernel names to run (default: all found)")
    return p.parse_args(argv)


def main_single(
    name: str, run: Callable[[Harness], list[Record]], goals: dict[str, str], bandwidth_bound: bool = True
) -> int:
    """Entry point for ``python bench/kernels/bench_<op>.py [--tiny]``: run, print, no JSON unless --out."""
    args = parse_args()
    h = Harness(tiny=args.tiny, reps=args.reps)
    records = run(h)
    print_table(records, h.copy_gbps)
    summary = {name: summarize(records, goals, bandwidth_bound)}
    print(json.dumps(summary, indent=2))
    if args.out:
        write_results("kernels", records, summary, h, args.out)
    return 0
