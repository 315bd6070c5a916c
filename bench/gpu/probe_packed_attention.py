"""Document-masked causal attention on a packed row: which kernel does the forward and backward fastest?

Ours runs packed rows through `torch.nn.attention.varlen.varlen_attn` (FlashAttention; `models.attention`), while
unpacked rows get cuDNN. On the H200 a packed step of ours took 633 ms against 561 at 4x2048, the same tokens and less
attention work (session 24). This probe times forward + backward (bench/_harness.py, median of --reps) over one packed
row of `[T, H, D]` tokens, 32 query and 8 kv heads of 128, bf16, for:

- ``flash_varlen``: `varlen_attn(..., window_size=(-1, 0))`, kv heads repeated to 32 (what ours ran up to session
  25) and shared (FlashAttention's varlen kernels take fewer kv heads than query heads and sum dk, dv per group
  themselves; ours since session 25);
- ``cudnn_thd``: `CudnnRagged` below, `aten._cudnn_attention_forward` / `_backward` with cumulative sequence
  lengths (cuDNN's ragged layout; torch's own varlen path keeps it off), kv heads repeated to 32 and, separately,
  shared. On the H200 (session 26, torch 2.11) its outputs matched but dq and dk did not (relative differences up to
  1e37) and it took 130-170 ms forward + backward against 0.7-1.9 for flash varlen, so ours has no such option;
- ``per_doc_cudnn``: causal SDPA limited to cuDNN, once per document (`enable_gqa`);
- ``flex_compiled``: `torch.compile(flex_attention)` with a document-causal block mask and `enable_gqa` (DESIGN.md
  measured 1.45 ms at 8 documents); the block mask is built once outside the timing, its build timed on its own
  (``mask_ms``: once per forward in a model, shared by the layers).

Each case's output and input gradients are compared with ``per_doc_cudnn``'s (the reference: plain causal attention
on each document) as the largest difference over the largest value. A case that raises is recorded with its error
(one line) and the next runs. One JSON line per case; all of them into --out.

    python bench/gpu/probe_packed_attention.py --out $OUT/packed_attention.json
    python bench/gpu/probe_packed_attention.py --tiny --out /tmp/packed_attention.json   # CPU: per-document SDPA only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import Harness, environment  # noqa: E402

# The packed e2e's first row (6 documents, seeded: run_stack's packed_docs_per_step / packed_lens_step0), its first
# batch of 11 documents' count at the same mean length, and 32 short documents.
DOCS = {
    "e2e_step0_6docs": [1187, 1867, 1562, 1797, 585, 1194],
    "11docs": [745] * 10 + [742],
    "32docs": [256] * 32,
    # As a CUDA graph's capture hands them over (models.attention.cu_seqlens with static_docs): 10 empty documents
    # after the real ones and the row length as the longest (before session 25).
    "e2e_step0_6docs_10empty": [1187, 1867, 1562, 1797, 585, 1194] + [0] * 10,
    # the same with the longest bounded as models.graphs does since session 25 (2 x the warm-up's ~1,900 -> 4,096)
    "e2e_step0_6docs_10empty_4096": [1187, 1867, 1562, 1797, 585, 1194] + [0] * 10,
}


def _inputs(h: Harness, lens: list[int], heads: tuple[int, int, int]):
    hq, hk, d = heads
    t = sum(lens)
    g = torch.Generator(device=h.device).manual_seed(0)
    q, k, v = (torch.randn(t, n, d, device=h.device, dtype=h.dtype, generator=g) for n in (hq, hk, hk))
    dy = torch.randn(t, hq, d, device=h.device, dtype=h.dtype, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=h.device, dtype=torch.int32)
    return q, k, v, dy, cu


def per_doc(q, k, v, cu, backend) -> torch.Tensor:
    """Causal SDPA on each document of a `[T, H, D]` row; `[T, Hq, D]`."""
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        qd, kd, vd = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        with backend():
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=kd.shape[1] != qd.shape[1])
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


def flash_varlen(q, k, v, cu, max_len: int, repeat: bool) -> torch.Tensor:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    extra = {}
    if repeat:
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    elif "enable_gqa" in inspect.signature(varlen_attn).parameters:  # torch >= 2.12 checks the head counts
        extra = {"enable_gqa": True}
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0), **extra)


class CudnnRagged(torch.autograd.Function):
    """Causal attention over each document of `[T, H, D]` tokens in cuDNN's ragged layout: torch's
    `_cudnn_attention_forward` / `_backward` with cumulative sequence lengths, saving what the backward reads as
    SDPA's cuDNN node does."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len: int, scale: float):
        q, k, v = (t.contiguous() for t in (q, k, v))  # the ragged offsets count each token's heads as one run
        out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, seed, offset, cu)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, seed, offset, cu = ctx.saved_tensors
        # attn_bias None (an undefined tensor): an empty one counts as a bias, which the ragged backward refuses
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            grad.contiguous(), q, k, v, out, lse, seed, offset, None, cu, cu, ctx.max_len, ctx.max_len, 0.0, True,
            scale=ctx.scale,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


def cudnn_thd(q, k, v, cu, max_len: int, repeat: bool) -> torch.Tensor:
    if repeat:
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return CudnnRagged.apply(q, k, v, cu, max_len, q.shape[-1] ** -0.5)


_FLEX = {}


def flex_mask(cu: torch.Tensor, t: int):
    """The document-causal block mask of a `[T]` row with these bounds (what a model would build once a forward)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), torch.diff(cu.long()), output_size=t)

    def document_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    return create_block_mask(document_causal, None, None, t, t, device=cu.device)


def flex_compiled(q, k, v, cu) -> torch.Tensor:
    """FlexAttention over a `[T, H, D]` row: `[1, H, T, D]` views and the row's block mask (built once per set of
    bounds and cached)."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    key = tuple(cu.tolist())
    if key not in _FLEX:
        _FLEX[key] = flex_mask(cu, q.shape[0])
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = _FLEX["fn"](qb, kb, vb, block_mask=_FLEX[key], enable_gqa=kb.shape[1] != qb.shape[1])
    return out.squeeze(0).transpose(0, 1)


def case(h: Harness, name: str, lens: list[int], heads, fn, reference) -> tuple[dict, list | None]:
    """One case's row (times, differences from ``reference``, or its error) and its output and input gradients."""
    q, k, v, dy, cu = _inputs(h, lens, heads)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    row: dict = {"case": name, "docs": len(lens), "tokens": sum(lens)}
    try:
        out = fn(*leaves, cu)
        grads = torch.autograd.grad(out, leaves, dy)
        if reference is not None:
            for label, got, want in zip(["out", "dq", "dk", "dv"], (out, *grads), reference):
                diff = (got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)
                row[f"{label}_rel_diff"] = float(diff)

        def fwd_bwd(_):
            o = fn(*leaves, cu)
            torch.autograd.grad(o, leaves, dy)

        def fwd(_):
            with torch.no_grad():
                fn(*leaves, cu)

        row["fwd_ms"] = round(h.time(fwd).ms, 4)
        row["fwd_bwd_ms"] = round(h.time(fwd_bwd).ms, 4)
        return row, [out.detach(), *(g.detach() for g in grads)]
    except Exception as exc:  # a kernel refusing the layout is an answer too
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return row, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 4/2 heads of 16, short documents")
    args = p.parse_args(argv)
    h = Harness(tiny=args.tiny, reps=args.reps, warmup=3)
    if args.tiny:
        heads, docs, backend = (4, 2, 16), {"tiny": [5, 9, 3]}, contextlib.nullcontext
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        heads, docs = (32, 8, 128), DOCS
        backend = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])  # noqa: E731
    rows = []
    for label, lens in docs.items():
        max_len = 4096 if label.endswith("_4096") else sum(lens) if label.endswith("empty") else max(lens)
        row, ref = case(
            h, f"{label}/per_doc_cudnn", lens, heads, lambda q, k, v, cu: per_doc(q, k, v, cu, backend), None
        )
        rows.append(row)
        if not args.tiny:
            cases = {
                "flash_varlen_repeated_kv": lambda q, k, v, cu, m=max_len: flash_varlen(q, k, v, cu, m, True),
                "flash_varlen_shared_kv": lambda q, k, v, cu, m=max_len: flash_varlen(q, k, v, cu, m, False),
                "cudnn_thd_repeated_kv": lambda q, k, v, cu, m=max_len: cudnn_thd(q, k, v, cu, m, True),
                "cudnn_thd_shared_kv": lambda q, k, v, cu, m=max_len: cudnn_thd(q, k, v, cu, m, False),
                "flex_compiled": lambda q, k, v, cu: flex_compiled(q, k, v, cu),
            }
            for name, fn in cases.items():
                row, _ = case(h, f"{label}/{name}", lens, heads, fn, ref)
                if name == "flex_compiled" and "error" not in row:
                    cu = _inputs(h, lens, heads)[-1]
                    row["mask_ms"] = round(h.time(lambda _, cu=cu, t=sum(lens): flex_mask(cu, t)).ms, 4)
                rows.append(row)
                torch.cuda.empty_cache()
        for r in rows[-(1 if args.tiny else 6) :]:
            print(json.dumps(r), flush=True)
    doc = {"bench": "packed_attention", "heads": list(heads), "docs": docs, "environment": environment(), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
