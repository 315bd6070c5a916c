"""RoPE benchmark: torch reference, torch.compile of it, Liger-Kernel, ours; forward, backward, both.

q and k enter as attention builds them, ``proj(x).view(B, S, H, D).transpose(1, 2)`` (strided views),
with cos/sin ``[1, S, D]`` from position ids that restart per packed example. Shapes: 4 x 2048 tokens
with Llama-8B's 32 q / 8 kv heads of 128 (headline) and 1 x 8192 with 70B's 64 / 8. Minimum traffic:
read and write q and k once per direction (cos/sin are under 2% and left out).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness, Record, main_single  # noqa: E402

from raytune_llm.kernels import reference  # noqa: E402
from raytune_llm.kernels.rope import rope  # noqa: E402

NAME = "rope"
GOALS = {"bandwidth_fraction": ">= 0.75 of device copy", "speedup_vs_liger": ">= 1.0"}
BANDWIDTH_BOUND = True


def _cos_sin(seq: int, dim: int, device, dtype, doc_len: int = 512):
    # Position ids restart every doc_len tokens, as in a packed row; HF's rotary formula, theta 5e5.
    pos = (torch.arange(seq, device=device) % doc_len).float()
    inv = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = torch.outer(pos, inv)
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _liger():
    from liger_kernel.transformers.functional import liger_rope

    return liger_rope


def run(h: Harness) -> list[Record]:
    """Measure every provider at each shape (see the module docstring)."""
    shapes = (
        [("1x8 h4/2 d16", 1, 8, 4, 2, 16)]
        if h.tiny
        else [
            ("1x8192 h64/8 d128", 1, 8192, 64, 8, 128),
            ("4x2048 h32/8 d128", 4, 2048, 32, 8, 128),
        ]
    )
    records: list[Record] = []
    for i, (label, b, s, hq, hk, d) in enumerate(shapes):
        qp_src = torch.randn(b, s, hq * d, device=h.device, dtype=h.dtype)
        kp_src = torch.randn(b, s, hk * d, device=h.device, dtype=h.dtype)
        cos, sin = _cos_sin(s, d, h.device, h.dtype)

        def make_inputs(qp_src=qp_src, kp_src=kp_src, cos=cos, sin=sin):
            return qp_src.clone().requires_grad_(), kp_src.clone().requires_grad_(), cos, sin

        def attn_layout(fn, b=b, s=s, hq=hq, hk=hk, d=d):
            def call(qp, kp, cos_t, sin_t):
                q = qp.view(b, s, hq, d).transpose(1, 2)
                k = kp.view(b, s, hk, d).transpose(1, 2)
                return fn(q, k, cos_t, sin_t)

            return call

        es = qp_src.element_size()
        moved = 2 * b * s * (hq + hk) * d * es
        nbytes = {"forward": moved, "backward": moved, "full": 2 * moved}
        liger = h.liger(_liger)
        compiled = h.compile(reference.rope)
        providers = {
            "torch": attn_layout(reference.rope),
            "torch_compile": attn_layout(compiled) if compiled else None,
            "liger": attn_layout(liger) if liger else None,
            # HF's tables repeat their first half, which Liger's kernel assumes; ours is told so (halves_equal).
            "ours": attn_layout(functools.partial(rope, halves_equal=True)) if h.ours(rope) else None,
        }
        records += h.bench_case(NAME, label, make_inputs, providers, nbytes, headline=(i == len(shapes) - 1))
        del qp_src, kp_src
    return records


if __name__ == "__main__":
    sys.exit(main_single(NAME, run, GOALS, BANDWIDTH_BOUND))
