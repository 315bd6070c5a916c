"""Does one GEMM over concatenated weights beat the separate GEMMs the LoRA blocks run now? (8B shapes, bf16)

    python bench/kernels/bench_gemm_concat.py --out r.json     # GPU

The MLP runs ``G = X Wg^T`` and ``U = X Wu^T`` as two GEMMs, and backward ``dX = dG Wg + dU Wu`` as a GEMM and
an accumulating one; the attention block does the same over Q, K and V. The concatenated form is one GEMM each
way: ``[G | U] = X [Wg; Wu]^T`` and ``dX = [dG | dU] [Wg; Wu]``. cuBLAS tiles each output in waves over the 132
SMs; two GEMMs pay two partial last waves, and the separate backward reads and writes dX twice. Times are
bench/_harness.py's (CUDA events after an L2 flush, median), the separate and concatenated forms alternated
three times; the table gives the median of the three and the TFLOP/s of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import Harness, environment  # noqa: E402

HIDDEN, INTER, Q, KV = 4096, 14336, 4096, 1024


def _cases(m: int, dt: torch.dtype) -> dict[str, tuple]:
    """name -> (separate fn, concatenated fn, FLOPs); inputs built once per token count."""
    dev = "cuda"
    x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
    wg, wu = (torch.randn(INTER, HIDDEN, device=dev, dtype=dt) * 0.02 for _ in range(2))
    wgu = torch.cat((wg, wu))
    dgu = torch.randn(m, 2 * INTER, device=dev, dtype=dt)
    dg, du = dgu[:, :INTER].contiguous(), dgu[:, INTER:].contiguous()
    wq = torch.randn(Q, HIDDEN, device=dev, dtype=dt) * 0.02
    wk, wv = (torch.randn(KV, HIDDEN, device=dev, dtype=dt) * 0.02 for _ in range(2))
    wqkv = torch.cat((wq, wk, wv))
    dqkv = torch.randn(m, Q + 2 * KV, device=dev, dtype=dt)
    dq, dk, dv = (t.contiguous() for t in torch.split(dqkv, [Q, KV, KV], dim=1))

    def gu_sep():
        return x @ wg.t(), x @ wu.t()

    def gu_cat():
        return x @ wgu.t()

    def dx_gu_sep():
        dx = dg @ wg
        return dx.addmm_(du, wu)

    def dx_gu_cat():
        return dgu @ wgu

    def qkv_sep():
        return x @ wq.t(), x @ wk.t(), x @ wv.t()

    def qkv_cat():
        return x @ wqkv.t()

    def dx_qkv_sep():
        dx = dq @ wq
        dx.addmm_(dk, wk)
        return dx.addmm_(dv, wv)

    def dx_qkv_cat():
        return dqkv @ wqkv

    f_gu = 2 * m * HIDDEN * 2 * INTER
    f_qkv = 2 * m * HIDDEN * (Q + 2 * KV)
    return {
        "gate|up forward": (gu_sep, gu_cat, f_gu),
        "gate|up dX": (dx_gu_sep, dx_gu_cat, f_gu),
        "q|k|v forward": (qkv_sep, qkv_cat, f_qkv),
        "q|k|v dX": (dx_qkv_sep, dx_qkv_cat, f_qkv),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    args = p.parse_args()
    h = Harness()
    dt = torch.bfloat16
    rows = []
    square = torch.randn(8192, 8192, device="cuda", dtype=dt)
    ref_ms = h.time(lambda _, a=square: a @ a).ms
    rows.append(
        {
            "case": "square 8192^3",
            "tokens": 8192,
            "ms": round(ref_ms, 4),
            "tflops": round(2 * 8192**3 / ref_ms / 1e9, 1),
        }
    )
    del square
    for m in args.tokens:
        for name, (sep, cat, flops) in _cases(m, dt).items():
            t_sep, t_cat = [], []
            for _ in range(3):
                t_sep.append(h.time(lambda _, f=sep: f()).ms)
                t_cat.append(h.time(lambda _, f=cat: f()).ms)
            for kind, ts in (("separate", t_sep), ("concatenated", t_cat)):
                ms = statistics.median(ts)
                rows.append(
                    {
                        "case": f"{name} {kind}",
                        "tokens": m,
                        "ms": round(ms, 4),
                        "ms_all": [round(t, 4) for t in ts],
                        "tflops": round(flops / ms / 1e9, 1),
                    }
                )
            torch.cuda.empty_cache()
    for r in rows:
        print(f"{r['tokens']:6d} {r['case']:32s} {r['ms']:8.4f} ms {r['tflops']:7.1f} TFLOP/s")
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
