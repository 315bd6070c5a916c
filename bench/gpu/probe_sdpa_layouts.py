"""cuDNN SDPA at the long e2e shapes: does the tensors' layout or GQA's handling change attention's time?

At 1x65536 attention (cuDNN, forward + backward) is ~7.0 s of the 11.2 s step (session 15's probe: 56.9 / 218.7 ms a
layer). That probe fed contiguous `[B, H, S, D]` tensors with `enable_gqa`. This one times forward and forward +
backward (bench/_harness.py, median of 5) of `F.scaled_dot_product_attention(is_causal=True)` limited to cuDNN, for:
q/k/v contiguous `[B, H, S, D]` or transposed views of `[B, S, H, D]` storage (what a projection's output gives), the
output gradient in either layout, and kv heads shared (`enable_gqa`) or repeated to 32. One JSON line per case;
all of them into --out. `--tiny`: a CPU smoke run (SDPA's own choice, small shapes).
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

from _harness import Harness  # noqa: E402


def _inputs(h: Harness, b: int, s: int, heads: tuple[int, int, int], layout: str, repeat: bool):
    hq, hk, d = heads
    g = torch.Generator(device=h.device).manual_seed(0)

    def make(n: int) -> torch.Tensor:
        if layout == "bshd":
            t = torch.randn(b, s, n, d, device=h.device, dtype=h.dtype, generator=g).transpose(1, 2)
        else:
            t = torch.randn(b, n, s, d, device=h.device, dtype=h.dtype, generator=g)
        return t.requires_grad_()

    q, k, v = make(hq), make(hk), make(hk)
    return q, k, v, hq // hk if repeat else 1


def case(h: Harness, s: int, heads, layout: str, grad_layout: str, repeat: bool, backend) -> dict:
    q, k, v, n_rep = _inputs(h, 1, s, heads, layout, repeat)
    hq, hk, d = heads

    def attn():
        kk, vv = (k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)) if n_rep > 1 else (k, v)
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=kk.shape[1] != hq)

    with backend():
        out = attn()
    dy = torch.randn(1, s, hq, d, device=h.device, dtype=h.dtype).transpose(1, 2)
    if grad_layout == "bhsd":
        dy = dy.contiguous()

    def fwd(_):
        with torch.no_grad(), backend():
            attn()

    def fwd_bwd(_):
        with backend():
            o = attn()
        torch.autograd.grad(o, (q, k, v), dy)

    return {
        "seq": s,
        "layout": layout,
        "grad_layout": grad_layout,
        "kv": "repeated" if repeat else "enable_gqa",
        "out_stride": list(out.stride()),
        "fwd_ms": round(h.time(fwd).ms, 3),
        "fwd_bwd_ms": round(h.time(fwd_bwd).ms, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seqs", default="16384,65536")
    args = p.parse_args()
    h = Harness(tiny=args.tiny, reps=5, warmup=2)
    if args.tiny:
        seqs, heads, backend = [64], (4, 2, 16), contextlib.nullcontext
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        seqs, heads = [int(x) for x in args.seqs.split(",")], (32, 8, 128)
        backend = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])  # noqa: E731
    rows = []
    for s in seqs:
        for layout, grad_layout, repeat in [
            ("bhsd", "bhsd", False),
            ("bshd", "bshd", False),
            ("bshd", "bhsd", False),
            ("bhsd", "bhsd", True),
            ("bshd", "bshd", True),
        ]:
            try:
                row = case(h, s, heads, layout, grad_layout, repeat, backend)
            except RuntimeError as exc:  # cuDNN refusing a layout is an answer too
                row = {"seq": s, "layout": layout, "kv": repeat, "error": str(exc).splitlines()[0][:200]}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        gpu = "cpu" if args.tiny else torch.cuda.get_device_name()
        json.dump({"torch": torch.__version__, "gpu": gpu, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
