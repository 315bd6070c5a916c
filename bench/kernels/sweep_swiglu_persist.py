"""Two questions about the LoRA MLP's [N, I] passes, timed on the GPU in one run.

1. Persistent LoRA SwiGLU kernels: each program owns one column block, loads its adapters' ``[r, BN]`` tiles once and
   walks a span of rows ``BM`` at a time (the loop software-pipelined at ``num_stages``), against
   kernels/lora_swiglu.py's one-tile programs (which load those tiles again for every tile, and sit at 0.62-0.76 of copy
   bandwidth at 65,536 x 14,336 where plain SwiGLU reaches 0.96). Same math and the same single-step rank-r dot, so the
   bits must match the library kernels'; every variant is checked for that.
2. What a K-extended gate/up GEMM costs: ``[N, K] x [K, I]`` at K = 4,096 and 4,096 plus 16, 32, 64 and 128 (the
   adapters' columns, padded), the layout the forward runs (``X @ W.t()``).

    python bench/kernels/sweep_swiglu_persist.py --out $OUT/swiglu_persist.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from raytune_llm.kernels import lora_swiglu as lib  # noqa: E402


@triton.jit
def _fwd_persist(
    G_ptr, U_ptr, H_ptr, XAG_ptr, XAU_ptr, BG_ptr, BU_ptr,
    stride_xag, stride_xau, stride_bg0, stride_bg1, stride_bu0, stride_bu1,
    n_rows, n_cols, rank_g, rank_u, scale_g, scale_u, span,
    R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, STORE_GU: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.arange(0, R_PAD)
    cm = cols < n_cols
    bg = tl.load(BG_ptr + k[:, None] * stride_bg1 + cols[None, :] * stride_bg0, mask=(k[:, None] < rank_g) & cm[None, :],
                 other=0.0)  # fmt: skip
    bu = tl.load(BU_ptr + k[:, None] * stride_bu1 + cols[None, :] * stride_bu0, mask=(k[:, None] < rank_u) & cm[None, :],
                 other=0.0)  # fmt: skip
    r_begin = tl.program_id(1).to(tl.int64) * span
    for r0 in tl.range(r_begin, r_begin + span, BM, num_stages=STAGES):
        rows = r0 + tl.arange(0, BM)
        rm = rows < n_rows
        mask = rm[:, None] & cm[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xg = tl.load(XAG_ptr + rows[:, None] * stride_xag + k[None, :], mask=rm[:, None] & (k[None, :] < rank_g), other=0.0)
        xu = tl.load(XAU_ptr + rows[:, None] * stride_xau + k[None, :], mask=rm[:, None] & (k[None, :] < rank_u), other=0.0)
        g = (g + scale_g * tl.dot(xg, bg, input_precision="tf32")).to(G_ptr.dtype.element_ty)
        u = (u + scale_u * tl.dot(xu, bu, input_precision="tf32")).to(U_ptr.dtype.element_ty)
        if STORE_GU:
            tl.store(G_ptr + offs, g, mask=mask)
            tl.store(U_ptr + offs, u, mask=mask)
        gf = g.to(tl.float32)
        h = gf * tl.sigmoid(gf) * u.to(tl.float32)
        tl.store(H_ptr + offs, h.to(H_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_persist(
    DH_ptr, G_ptr, U_ptr, LOW_ptr, AD_ptr, XAG_ptr, XAU_ptr, BG_ptr, BU_ptr,
    stride_low, stride_ad, stride_xag, stride_xau, stride_bg0, stride_bg1, stride_bu0, stride_bu1,
    n_rows, n_cols, rank_d, rank_g, rank_u, scale_g, scale_u, span,
    R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FINISH: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.arange(0, R_PAD)
    cm = cols < n_cols
    ad = tl.load(AD_ptr + k[:, None] * stride_ad + cols[None, :], mask=(k[:, None] < rank_d) & cm[None, :], other=0.0)
    if FINISH:
        bg = tl.load(BG_ptr + k[:, None] * stride_bg1 + cols[None, :] * stride_bg0,
                     mask=(k[:, None] < rank_g) & cm[None, :], other=0.0)  # fmt: skip
        bu = tl.load(BU_ptr + k[:, None] * stride_bu1 + cols[None, :] * stride_bu0,
                     mask=(k[:, None] < rank_u) & cm[None, :], other=0.0)  # fmt: skip
    r_begin = tl.program_id(1).to(tl.int64) * span
    for r0 in tl.range(r_begin, r_begin + span, BM, num_stages=STAGES):
        rows = r0 + tl.arange(0, BM)
        rm = rows < n_rows
        mask = rm[:, None] & cm[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        dh = tl.load(DH_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lo = tl.load(LOW_ptr + rows[:, None] * stride_low + k[None, :], mask=rm[:, None] & (k[None, :] < rank_d), other=0.0)
        dh = dh + 1.0 * tl.dot(lo, ad, input_precision="tf32")
        g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if FINISH:
            xg = tl.load(XAG_ptr + rows[:, None] * stride_xag + k[None, :], mask=rm[:, None] & (k[None, :] < rank_g),
                         other=0.0)  # fmt: skip
            xu = tl.load(XAU_ptr + rows[:, None] * stride_xau + k[None, :], mask=rm[:, None] & (k[None, :] < rank_u),
                         other=0.0)  # fmt: skip
            g = (g + scale_g * tl.dot(xg, bg, input_precision="tf32")).to(G_ptr.dtype.element_ty).to(tl.float32)
            u = (u + scale_u * tl.dot(xu, bu, input_precision="tf32")).to(U_ptr.dtype.element_ty).to(tl.float32)
        sg = tl.sigmoid(g)
        silu = g * sg
        h = silu * u
        dg = dh * u * sg * (1.0 + g * (1.0 - sg))
        du = dh * silu
        tl.store(DH_ptr + offs, h.to(DH_ptr.dtype.element_ty), mask=mask)
        tl.store(G_ptr + offs, dg.to(G_ptr.dtype.element_ty), mask=mask)
        tl.store(U_ptr + offs, du.to(U_ptr.dtype.element_ty), mask=mask)


def _time(fn, reset, reps: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps + 1):
        reset()
        torch.cuda._sleep(1_000_000)  # the launch queued before the GPU reaches it
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--settings", default="16:128:4:1:8,16:128:4:2:8,16:128:4:3:8,16:128:4:2:16,32:128:4:2:8,"
                   "16:128:8:2:8,16:256:8:2:8,8:128:2:2:8,16:64:2:2:16")  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    n, i, r = args.rows, 14336, 16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dt)

    G0, U0, dH0 = rand(n, i), rand(n, i), rand(n, i)
    xa_g, xa_u, Bg, Bu = rand(n, r), rand(n, r), rand(i, r, scale=0.1), rand(i, r, scale=0.1)
    low, Ad = rand(n, r), rand(r, i, scale=0.1)
    G, U, dH = G0.clone(), U0.clone(), dH0.clone()
    src = torch.empty(2**29, dtype=dt, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 2 / _time(lambda: dst.copy_(src), lambda: None, 5) / 1e6
    del src, dst

    def reset(*pairs):
        return lambda: [d.copy_(s) for d, s in pairs] and None

    fin = (xa_g, xa_u, Bg, Bu, 2.0, 0.5)
    cases = {  # name: (library call, reset, bytes moved)
        "fwd_gu": (lambda: lib.lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5), reset((G, G0), (U, U0)), 5),
        "fwd_h": (lambda: lib.lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5, store_gu=False),
                  reset((G, G0), (U, U0)), 3),  # fmt: skip
        "bwd": (lambda: lib.lora_swiglu_backward(dH, G, U, low, Ad), reset((G, G0), (U, U0), (dH, dH0)), 6),
        "bwd_finish": (lambda: lib.lora_swiglu_backward(dH, G, U, low, Ad, finish=fin),
                       reset((G, G0), (U, U0), (dH, dH0)), 6),  # fmt: skip
    }
    rows, refs = [], {}
    for name, (fn, rs, nbytes) in cases.items():
        ms = _time(fn, rs, args.reps)
        rs()
        out = fn()
        refs[name] = [t.clone() for t in ((out, G, U) if name.startswith("fwd") else (dH, G, U))]
        frac = nbytes * n * i * 2 / ms / 1e6 / copy_gbs
        rows.append({"kernel": name, "variant": "library", "ms": round(ms, 4), "bandwidth_fraction": round(frac, 3)})
        print(f"{name:11} library              {ms:7.3f} ms  {frac:.3f} of copy", flush=True)

    for s in args.settings.split(","):
        bm, bn, warps, stages, spans = (int(v) for v in s.split(":"))
        span = triton.cdiv(triton.cdiv(n, spans), bm) * bm
        grid = (triton.cdiv(i, bn), triton.cdiv(n, span))
        for name, (_, rs, nbytes) in cases.items():
            if name.startswith("fwd"):
                H = torch.empty_like(G)

                def fn(H=H, store=name == "fwd_gu"):
                    _fwd_persist[grid](G, U, H, xa_g, xa_u, Bg, Bu, r, r, r, 1, r, 1, n, i, r, r, 2.0, 0.5, span,
                                       R_PAD=16, BM=bm, BN=bn, STORE_GU=store, STAGES=stages, num_warps=warps)  # fmt: skip
                    return H
            else:

                def fn(finish=name == "bwd_finish"):
                    _bwd_persist[grid](dH, G, U, low, Ad, xa_g, xa_u, Bg, Bu, r, i, r, r, r, 1, r, 1, n, i, r, r, r,
                                       2.0, 0.5, span, R_PAD=16, BM=bm, BN=bn, FINISH=finish, STAGES=stages,
                                       num_warps=warps)  # fmt: skip
            try:
                ms = _time(fn, rs, args.reps)
                rs()
                out = fn()
                got = (out, G, U) if name.startswith("fwd") else (dH, G, U)
                exact = all(torch.equal(a, b) for a, b in zip(got, refs[name]))
            except Exception as exc:  # a setting that does not compile: recorded, not fatal
                print(f"{name:11} {s:20} failed: {str(exc)[:120]}")
                rows.append({"kernel": name, "variant": s, "error": str(exc)[:300]})
                continue
            frac = nbytes * n * i * 2 / ms / 1e6 / copy_gbs
            rows.append({"kernel": name, "variant": s, "ms": round(ms, 4), "bandwidth_fraction": round(frac, 3),
                         "exact": exact})  # fmt: skip
            print(f"{name:11} {s:20} {ms:7.3f} ms  {frac:.3f} of copy  exact {exact}", flush=True)

    # K-extended gate/up GEMM: [n, 4096 + e] x [4096 + e, 14336], as X @ W.t()
    del G, U, dH, G0, U0, dH0
    gemm = []
    for e in (0, 16, 32, 64, 128):
        X = rand(n, 4096 + e)
        W = rand(i, 4096 + e, scale=0.02)
        out = torch.empty(n, i, dtype=dt, device=dev)
        ms = _time(lambda X=X, W=W, out=out: torch.mm(X, W.t(), out=out), lambda: None, args.reps)
        tflops = 2 * n * i * (4096 + e) / ms / 1e9
        gemm.append({"k": 4096 + e, "ms": round(ms, 4), "tflops": round(tflops, 1)})
        print(f"gemm K={4096 + e:5}  {ms:7.3f} ms  {tflops:6.1f} TFLOP/s", flush=True)
        del X, W, out
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": [n, i, r], "copy_gbs": round(copy_gbs, 1), "rows": rows, "gemm": gemm}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
