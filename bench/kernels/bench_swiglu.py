"""SwiGLU benchmark: torch reference, torch.compile of it, Liger-Kernel, ours; forward, backward, both.

Shapes: 8192 tokens at Llama-8B's intermediate 14336 (headline) and 70B's 28672. Minimum traffic:
forward reads gate and up and writes the product; backward reads dc, gate and up and writes two
gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness, Record, main_single  # noqa: E402

from raytune_llm.kernels import reference  # noqa: E402
from raytune_llm.kernels.swiglu import swiglu  # noqa: E402

NAME = "swiglu"
GOALS = {"bandwidth_fraction": ">= 0.75 of device copy", "speedup_vs_liger": ">= 1.0"}
BANDWIDTH_BOUND = True


def _liger():
    from liger_kernel.transformers.functional import liger_swiglu

    return liger_swiglu


def run(h: Harness) -> list[Record]:
    """Measure every provider at each shape (see the module docstring)."""
    shapes = [("16x96", 16, 96)] if h.tiny else [("8192x28672", 8192, 28672), ("8192x14336", 8192, 14336)]
    records: list[Record] = []
    for i, (label, n, inter) in enumerate(shapes):
        g_src = torch.randn(n, inter, device=h.device, dtype=h.dtype)
        u_src = torch.randn(n, inter, device=h.device, dtype=h.dtype)

        def make_inputs(g_src=g_src, u_src=u_src):
            # Intermediates, as gate_proj / up_proj outputs are in the model (untimed clones of leaves): Liger
            # writes its gradients over its inputs whatever they are, ours only over intermediates.
            return g_src.detach().requires_grad_().clone(), u_src.detach().requires_grad_().clone()

        es = g_src.element_size()
        nbytes = {"forward": 3 * n * inter * es, "backward": 5 * n * inter * es}
        nbytes["full"] = nbytes["forward"] + nbytes["backward"]
        providers = {
            "torch": reference.swiglu,
            "torch_compile": h.compile(reference.swiglu),
            "liger": h.liger(_liger),
            "ours": h.ours(swiglu),
        }
        records += h.bench_case(NAME, label, make_inputs, providers, nbytes, headline=(i == len(shapes) - 1))
        del g_src, u_src
    return records


if __name__ == "__main__":
    sys.exit(main_single(NAME, run, GOALS, BANDWIDTH_BOUND))
