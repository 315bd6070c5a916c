"""What the attention autograd nodes save on the GPU, and how long attention's forward and backward take.

For issue 5's recompute planning: at each e2e shape (8B heads: 32 query, 8 kv, head dim 128) it times the
attention path models.attention.causal_attention takes (SDPA is_causal with GQA, or flash varlen for packed
rows), forward alone and forward + backward (bench/_harness.py, median of 5), and prints the grad_fn's class
and its saved tensors (name, shape, dtype). Prints one JSON line per shape; writes them to --out. `--tiny`: a
CPU smoke run at small shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness  # noqa: E402

from raytune_llm.models.attention import build_attn_meta, causal_attention  # noqa: E402


def saved(fn) -> dict:
    out = {}
    for name in dir(fn):
        if not name.startswith("_saved_"):
            continue
        try:
            v = getattr(fn, name)
        except Exception as exc:  # noqa: BLE001 - a probe: record what failed
            out[name] = f"error: {exc}"[:80]
            continue
        out[name] = [list(v.shape), str(v.dtype)] if isinstance(v, torch.Tensor) else repr(v)[:60]
    return out


def _backend(name: str):
    """A context that lets SDPA use only ``name`` ("cudnn", "flash", "efficient"), or lets it choose ("auto")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel([table[name]])


def probe(
    h: Harness, name: str, b: int, s: int, packed: bool, heads: tuple[int, int, int], backend: str = "auto"
) -> dict:
    with _backend(backend):
        return _probe(h, name, b, s, packed, heads) | {"backend": backend}


def _probe(h: Harness, name: str, b: int, s: int, packed: bool, heads: tuple[int, int, int]) -> dict:
    hq, hk, d = heads
    g = torch.Generator(device=h.device).manual_seed(0)
    q = torch.randn(b, hq, s, d, device=h.device, dtype=h.dtype, generator=g).requires_grad_()
    k = torch.randn(b, hk, s, d, device=h.device, dtype=h.dtype, generator=g).requires_grad_()
    v = torch.randn(b, hk, s, d, device=h.device, dtype=h.dtype, generator=g).requires_grad_()
    if packed:
        starts = [round(x * s / 8192) for x in (0, 1500, 1800, 3900, 4000, 6100)]  # documents of a packed row
        pos = torch.cat([torch.arange(e - a) for a, e in zip(starts, starts[1:] + [s])])[None].to(h.device)
    else:
        pos = torch.arange(s, device=h.device)[None].expand(b, -1)
    meta = build_attn_meta(pos, None, b, s, q.device)
    out = causal_attention(q, k, v, meta, d**-0.5)
    fn = out.grad_fn
    chain = []
    while fn is not None and len(chain) < 4:
        chain.append({"node": type(fn).__name__, "saved": saved(fn)})
        fn = fn.next_functions[0][0] if fn.next_functions else None
    dy = torch.randn_like(out)

    def fwd(_):
        with torch.no_grad():
            causal_attention(q, k, v, meta, d**-0.5)

    def fwd_bwd(_):
        o = causal_attention(q, k, v, meta, d**-0.5)
        torch.autograd.grad(o, (q, k, v), dy)

    row = {
        "shape": name,
        "fwd_ms": round(h.time(fwd).ms, 3),
        "fwd_bwd_ms": round(h.time(fwd_bwd).ms, 3),
        "nodes": chain,
    }
    row["per_step_fwd_ms_32_layers"] = round(32 * row["fwd_ms"], 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 4 / 2 heads of 16, rows of 64")
    p.add_argument(
        "--backends",
        default="auto",
        help="comma list of auto, cudnn, flash, efficient (SDPA's choice "
        "limited to one; the packed shape takes flash varlen whatever this says)",
    )
    p.add_argument("--shapes", default=None, help="comma list of shape names (default: all)")
    args = p.parse_args()
    h = Harness(tiny=args.tiny, reps=5, warmup=2)
    rows = []
    shapes = [("4x2048", 4, 2048, False), ("1x16384", 1, 16384, False), ("packed_8192", 1, 8192, True)]
    shapes += [("1x65536", 1, 65536, False)]
    if args.tiny:
        shapes = [("2x64", 2, 64, False), ("packed_64", 1, 64, True)]
    if args.shapes:
        shapes = [sh for sh in shapes if sh[0] in args.shapes.split(",")]
    for name, b, s, packed in shapes:
        for backend in args.backends.split(","):
            try:
                row = probe(h, name, b, s, packed, (4, 2, 16) if args.tiny else (32, 8, 128), backend)
            except RuntimeError as exc:  # a backend that refuses these inputs
                row = {"shape": name, "backend": backend, "error": str(exc).splitlines()[0][:200]}
            print(json.dumps({k: v for k, v in row.items() if k != "nodes"}), flush=True)
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        gpu = "cpu" if args.tiny else torch.cuda.get_device_name()
        json.dump({"torch": torch.__version__, "gpu": gpu, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
