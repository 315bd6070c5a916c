"""RMSNorm benchmark: torch reference, torch.compile of it, Liger-Kernel, ours; forward, backward, both.

Shapes: 8192 tokens (4 x 2048, the anchors' batch) at Llama-8B's hidden 4096 (headline) and 70B's 8192.
Minimum traffic: forward reads x and writes y; backward reads dy and x and writes dx (w, rstd and
the dw partials are under 0.1% at these sizes and left out).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness, Record, main_single  # noqa: E402

from raytune_llm.kernels import reference  # noqa: E402
from raytune_llm.kernels.rms_norm import rms_norm  # noqa: E402

NAME = "rms_norm"
GOALS = {"bandwidth_fraction": ">= 0.75 of device copy", "speedup_vs_liger": ">= 1.0"}
BANDWIDTH_BOUND = True
EPS = 1e-5


def _liger():
    from liger_kernel.transformers.functional import liger_rms_norm

    return lambda x, w: liger_rms_norm(x, w, EPS)


def run(h: Harness) -> list[Record]:
    """Measure every provider at each shape (see the module docstring)."""
    shapes = [("16x64", 16, 64)] if h.tiny else [("8192x8192", 8192, 8192), ("8192x4096", 8192, 4096)]
    records: list[Record] = []
    for i, (label, n, hid) in enumerate(shapes):
        x_src = torch.randn(n, hid, device=h.device, dtype=h.dtype)
        w = (1 + 0.1 * torch.randn(hid, device=h.device, dtype=h.dtype)).requires_grad_()

        def make_inputs(x_src=x_src, w=w):
            return x_src.clone().requires_grad_(), w

        es = x_src.element_size()
        nbytes = {"forward": 2 * n * hid * es, "backward": 3 * n * hid * es}
        nbytes["full"] = nbytes["forward"] + nbytes["backward"]
        ref = lambda x, w: reference.rms_norm(x, w, EPS)
        providers = {
            "torch": ref,
            "torch_compile": h.compile(ref),
            "liger": h.liger(_liger),
            "ours": h.ours(lambda x, w: rms_norm(x, w, EPS)),
        }
        records += h.bench_case(NAME, label, make_inputs, providers, nbytes, headline=(i == len(shapes) - 1))
        del x_src, w
    return records


if __name__ == "__main__":
    sys.exit(main_single(NAME, run, GOALS, BANDWIDTH_BOUND))
