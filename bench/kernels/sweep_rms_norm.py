"""RMSNorm launch settings on the GPU: the forward's bands per SM and warps; the backward's bands per SM, rows per
loop iteration and pipeline stages.

Forward: times `rms_norm_forward` (plain, and with the residual add) for each setting of `kernels.rms_norm._FWD`
(``per_sm`` 0: one program a row; ``warps`` 0: the default), each compared bit for bit with one program a row. Backward: times
`rms_norm_backward` alone (dx and dw from saved x, rstd and a given dy) for each setting of `kernels.rms_norm._BWD`,
beside Liger-Kernel's backward (autograd, `retain_graph`). The harness's timing (GPU pre-rolled, L2 flushed, median
of `--reps`). Bandwidth counts the minimum traffic: the forward reads x (and a) and writes y (and h); the backward
reads dy and x and writes dx.

    python bench/kernels/sweep_rms_norm.py --out $OUT/rms_norm_sweep.json
    python bench/kernels/sweep_rms_norm.py --shapes 65536x4096 --only fwd --out $OUT/rms_norm_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness, environment  # noqa: E402

from raytune_llm.kernels import rms_norm as mod  # noqa: E402

EPS = 1e-5


def _forward(h: Harness, n: int, hid: int, default: dict) -> list[dict]:
    """Every forward setting at one [n, hid] shape, plain and with the residual add."""
    rows: list[dict] = []
    x = torch.randn(n, hid, device="cuda", dtype=torch.bfloat16)
    a = torch.randn_like(x)
    w = 1 + 0.1 * torch.randn(hid, device="cuda", dtype=torch.bfloat16)
    for add in (None, a):
        mod._FWD.update(per_sm=0, warps=0)
        ref = mod.rms_norm_forward(x, w, EPS, add=add)
        nbytes = (2 if add is None else 4) * n * hid * x.element_size()
        for per_sm, warps in [(0, 0)] + list(itertools.product((1, 2, 3, 4, 6, 8, 16), (0, 4, 16))):
            mod._FWD.update(per_sm=per_sm, warps=warps)
            row = dict(shape=f"{n}x{hid}", kernel="fwd" if add is None else "fwd_add", per_sm=per_sm, warps=warps)
            try:
                same = all(torch.equal(g, e) for g, e in zip(mod.rms_norm_forward(x, w, EPS, add=add), ref))
                t = h.time(lambda _, add=add: mod.rms_norm_forward(x, w, EPS, add=add))
                row |= dict(ms=round(t.ms, 4), bandwidth_fraction=round(nbytes / (t.ms * 1e-3) / 1e9 / h.copy_gbps, 3),
                            identical=same)  # fmt: skip
            except Exception as exc:  # a setting that does not compile is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
    mod._FWD.update(default)
    return rows


def _shape(h: Harness, n: int, hid: int, default: dict) -> list[dict]:
    """Every backward setting and the peers at one [n, hid] shape."""
    rows: list[dict] = []
    x = torch.randn(n, hid, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(hid, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    _, rstd = mod.rms_norm_forward(x, w, EPS)
    nbytes = 3 * n * hid * x.element_size()
    ref_dx, ref_dw = mod.rms_norm_backward(dy, x, w, rstd)
    for per_sm, r, stages in itertools.product((2, 4, 8), (1, 2, 4), (0, 2, 3)):
        mod._BWD.update(per_sm=per_sm, rows=r, stages=stages)
        try:
            dx, dw = mod.rms_norm_backward(dy, x, w, rstd)
            same = bool(torch.equal(dx, ref_dx)) and bool(torch.allclose(dw.float(), ref_dw.float(), rtol=1e-2))
            t = h.time(lambda _: mod.rms_norm_backward(dy, x, w, rstd))
            rows.append(
                dict(shape=f"{n}x{hid}", provider="ours", per_sm=per_sm, rows=r, stages=stages, ms=round(t.ms, 4),
                     bandwidth_fraction=round(nbytes / (t.ms * 1e-3) / 1e9 / h.copy_gbps, 3), dx_identical=same)
            )  # fmt: skip
        except Exception as exc:  # a setting that does not compile is a result too
            rows.append(dict(shape=f"{n}x{hid}", provider="ours", per_sm=per_sm, rows=r, stages=stages,
                             error=f"{type(exc).__name__}: {str(exc)[:200]}"))  # fmt: skip
    mod._BWD.update(default)
    try:
        from liger_kernel.transformers.functional import liger_rms_norm

        xl = x.clone().requires_grad_()
        wl = w.clone().requires_grad_()
        y = liger_rms_norm(xl, wl, EPS)
        t = h.time(lambda _: torch.autograd.grad(y, (xl, wl), dy, retain_graph=True))
        rows.append(dict(shape=f"{n}x{hid}", provider="liger", ms=round(t.ms, 4),
                         bandwidth_fraction=round(nbytes / (t.ms * 1e-3) / 1e9 / h.copy_gbps, 3)))  # fmt: skip
    except ImportError:
        pass
    xo = x.clone().requires_grad_()
    wo = w.clone().requires_grad_()
    y = mod.rms_norm(xo, wo, EPS)
    t = h.time(lambda _: torch.autograd.grad(y, (xo, wo), dy, retain_graph=True))
    rows.append(dict(shape=f"{n}x{hid}", provider="ours_autograd_default", ms=round(t.ms, 4),
                     bandwidth_fraction=round(nbytes / (t.ms * 1e-3) / 1e9 / h.copy_gbps, 3)))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--shapes", default="8192x4096,8192x8192", help="NxH,...")
    p.add_argument("--only", choices=["fwd", "bwd"], help="one direction (default both)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    h = Harness(reps=args.reps)
    default, default_fwd = dict(mod._BWD), dict(mod._FWD)
    rows, fwd = [], []
    for n, hid in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        if args.only != "bwd":
            fwd += _forward(h, n, hid, default_fwd)
        if args.only != "fwd":
            rows += _shape(h, n, hid, default)
    doc = {"bench": "rms_norm_sweep", "copy_gbps": round(h.copy_gbps, 1), "default": default,
           "default_fwd": default_fwd, "environment": environment(), "rows": rows, "forward": fwd}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=1))
    for key in sorted({(r["shape"], r["kernel"]) for r in fwd}):
        best = sorted((r for r in fwd if (r["shape"], r["kernel"]) == key and "ms" in r), key=lambda r: r["ms"])
        print(f"== forward {key[0]} {key[1]} (copy {h.copy_gbps:.0f} GB/s)")
        for r in best[:6] + [r for r in best[6:] if r["per_sm"] == 0]:
            print(f"  per_sm={r['per_sm']:<2} warps={r['warps']:<2}  {r['ms']:8.4f} ms  bw {r['bandwidth_fraction']:.3f}"
                  f"  identical={r['identical']}")  # fmt: skip
        for r in fwd:
            if (r["shape"], r["kernel"]) == key and "error" in r:
                print(f"  error per_sm={r['per_sm']} warps={r['warps']}: {r['error'][:120]}")
    for shape in sorted({r["shape"] for r in rows}):
        best = sorted((r for r in rows if r["shape"] == shape and "ms" in r), key=lambda r: r["ms"])
        print(f"== {shape} (copy {h.copy_gbps:.0f} GB/s)")
        for r in best[:8] + [r for r in best[8:] if r["provider"] != "ours"]:
            knobs = f"per_sm={r.get('per_sm')} rows={r.get('rows')} stages={r.get('stages')}" if "per_sm" in r else ""
            print(
                f"  {r['provider']:<22} {r['ms']:8.4f} ms  bw {r['bandwidth_fraction']:.3f}  {knobs} {r.get('dx_identical', '')}"
            )
        for r in rows:
            if r["shape"] == shape and "error" in r:
                print(f"  error per_sm={r['per_sm']} rows={r['rows']} stages={r['stages']}: {r['error'][:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
