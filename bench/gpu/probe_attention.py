"""What the attention autograd nodes save on the GPU, and how long attention's forward and backward take.

For issue 5's recompute planning: at each e2e shape (8B heads: 32 query, 8 kv, head dim 128) it times the
attention path models.attention.causal_attention takes (SDPA is_causal with GQA, or flash varlen for packed
rows), forward alone and forward + backward (CUDA events, median of 5 after 2 warm-ups), and prints the
grad_fn's class and its saved tensors (name, shape, dtype). Prints one JSON line per shape; writes them to
--out.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from raytune_llm.models.attention import build_attn_meta, causal_attention


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


def timed(fn, reps=5, warm=2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def probe(name: str, b: int, s: int, packed: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, 32, s, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(b, 8, s, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(b, 8, s, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    if packed:
        starts = [0, 1500, 1800, 3900, 4000, 6100]
        pos = torch.cat([torch.arange(e - a) for a, e in zip(starts, starts[1:] + [s])])[None].cuda()
    else:
        pos = torch.arange(s, device="cuda")[None].expand(b, -1)
    meta = build_attn_meta(pos, None, b, s, q.device)
    out = causal_attention(q, k, v, meta, 128**-0.5)
    fn = out.grad_fn
    chain = []
    while fn is not None and len(chain) < 4:
        chain.append({"node": type(fn).__name__, "saved": saved(fn)})
        fn = fn.next_functions[0][0] if fn.next_functions else None
    dy = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            causal_attention(q, k, v, meta, 128**-0.5)

    def fwd_bwd():
        o = causal_attention(q, k, v, meta, 128**-0.5)
        torch.autograd.grad(o, (q, k, v), dy)

    row = {"shape": name, "fwd_ms": round(timed(fwd), 3), "fwd_bwd_ms": round(timed(fwd_bwd), 3), "nodes": chain}
    row["per_step_fwd_ms_32_layers"] = round(32 * row["fwd_ms"], 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    shapes = [("4x2048", 4, 2048, False), ("1x16384", 1, 16384, False), ("packed_8192", 1, 8192, True)]
    for name, b, s, packed in shapes + [("1x65536", 1, 65536, False)]:
        row = probe(name, b, s, packed)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
