"""RMSNorm backward launch settings on the GPU: bands per SM, rows per loop iteration, pipeline stages.

Times `rms_norm_backward` alone (dx and dw from saved x, rstd and a given dy) for each setting of
`kernels.rms_norm._BWD`, beside Liger-Kernel's backward (autograd, `retain_graph`) at the same shapes,
with the harness's timing (GPU pre-rolled, L2 flushed, median of `--reps`). Bandwidth counts the
minimum traffic: read dy and x, write dx.

    python bench/kernels/sweep_rms_norm_bwd.py --out $OUT/rms_norm_bwd_sweep.json
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


def _shape(h: Harness, n: int, hid: int, default: dict) -> list[dict]:
    """Every setting and the peers at one [n, hid] shape."""
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
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    h = Harness(reps=args.reps)
    default = dict(mod._BWD)
    rows = []
    for n, hid in [(8192, 4096), (8192, 8192)]:
        rows += _shape(h, n, hid, default)
    doc = {"bench": "rms_norm_bwd_sweep", "copy_gbps": round(h.copy_gbps, 1), "default": default,
           "environment": environment(), "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=1))
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
