"""Fused linear + cross-entropy benchmark: torch reference (full logits), torch.compile of it, Liger-Kernel, ours.

Shapes: Llama-3's head (H 4096, V 128256) at 32768 tokens with a trainable head (headline: Liger's
published configuration, 5.8 GB vs 27.6 GB) and with a frozen head (the LoRA case: no weight
gradient), plus 8192 tokens with a trainable head. The op is GEMM-bound (3 matmuls of
2 * N * H * V FLOP each with a trainable head, 2 with a frozen one), so no bandwidth fraction; the
memory goal is the peak at 32768 tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness, Record, main_single  # noqa: E402

from raytune_llm.kernels import reference  # noqa: E402
from raytune_llm.kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402

NAME = "fused_linear_cross_entropy"
GOALS = {
    "speedup_vs_liger": ">= 1.0",
    "peak_mib_ours": "<= peak_mib_liger at 32768 tokens x 128256 vocab",
}
BANDWIDTH_BOUND = False


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda hid, w, y: liger_fused_linear_cross_entropy(hid, w, y)


def run(h: Harness) -> list[Record]:
    """Measure every provider at each shape (see the module docstring)."""
    if h.tiny:
        shapes = [("32x16 V100 head=train", 32, 16, 100, True)]
    else:
        shapes = [
            ("8192x4096 V128256 head=train", 8192, 4096, 128256, True),
            ("32768x4096 V128256 head=frozen", 32768, 4096, 128256, False),
            ("32768x4096 V128256 head=train", 32768, 4096, 128256, True),
        ]
    records: list[Record] = []
    # One call is 30-300 ms at these sizes (the eager reference at 32768 tokens materialises ~40 GB):
    # 10 timed repetitions keep the module under ~3 minutes; the spread is reported beside the median.
    saved_reps, h.reps = h.reps, min(h.reps, 10)
    for i, (label, n, hid, vocab, train_head) in enumerate(shapes):
        gen = torch.Generator(device=h.device).manual_seed(0)
        x_src = torch.randn(n, hid, device=h.device, dtype=h.dtype, generator=gen)
        w = (torch.randn(vocab, hid, device=h.device, dtype=h.dtype, generator=gen) / hid**0.5).requires_grad_(
            train_head
        )
        y = torch.randint(0, vocab, (n,), device=h.device, generator=gen)
        y[::7] = -100  # some prompt tokens, as in instruction data

        def make_inputs(x_src=x_src, w=w, y=y):
            return x_src.clone().requires_grad_(), w, y

        providers = {
            "torch": reference.fused_linear_cross_entropy,
            "torch_compile": h.compile(reference.fused_linear_cross_entropy),
            "liger": h.liger(_liger),
            "ours": h.ours(fused_linear_cross_entropy),
        }
        # Backward alone is only the scaling of stored gradients for the fused providers; "full" is the figure.
        records += h.bench_case(NAME, label, make_inputs, providers, None, headline=(i == len(shapes) - 1))
        del x_src, w, y
    h.reps = saved_reps
    return records


if __name__ == "__main__":
    sys.exit(main_single(NAME, run, GOALS, BANDWIDTH_BOUND))
