"""NF4 dequantization: our Triton kernel against bitsandbytes' own kernel and the torch reference.

Shapes are the Llama-3.1-8B / 70B projection weights (quantized as the standard QLoRA stack does:
NF4, blocksize 64, double quant, bf16). Forward only (dequantization has no backward; it is
recorded as mode "full", which the summary reads). It is
store-bound: 0.5 B read + 2 B written per bf16 element, so the bandwidth fraction is the figure.

    python bench/kernels/bench_nf4.py                          # GPU
    TRITON_INTERPRET=1 python bench/kernels/bench_nf4.py --tiny  # CPU smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ for _harness
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root for raytune_llm

import bitsandbytes.functional as bnbF  # noqa: E402
import torch  # noqa: E402
from _harness import Harness, Record, main_single  # noqa: E402

from raytune_llm.kernels import reference  # noqa: E402
from raytune_llm.kernels.nf4 import NF4Weight, nf4_dequantize  # noqa: E402

NAME = "nf4"
GOALS = {"bandwidth_fraction": ">= 0.75 of device copy", "speedup_vs_bitsandbytes": ">= 1.0 (bit-identical output)"}
BANDWIDTH_BOUND = True

REAL = [("q_o 4096x4096", (4096, 4096)), ("gate_up 14336x4096", (14336, 4096)), ("70b_down 8192x28672", (8192, 28672))]
TINY = [("tiny 64x96", (64, 96)), ("tiny 130x70", (130, 70))]


def run(h: Harness) -> list[Record]:
    """Measure every provider at every shape (forward only).

    Args:
        h: the harness.

    Returns:
        The records.
    """
    shapes = TINY if h.tiny else REAL
    records: list[Record] = []
    for label, shape in shapes:
        w = (torch.randn(shape, device=h.device) * 0.02).to(torch.bfloat16)
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        del w
        nf4 = NF4Weight.from_bnb(packed, qs)

        def make_inputs(nf4=nf4, packed=packed, qs=qs):
            return (nf4, packed, qs)

        providers = {
            "torch": lambda w, p, q: reference.nf4_dequantize(w),
            "torch_compile": (lambda f: None if f is None else (lambda w, p, q: f(w)))(
                h.compile(reference.nf4_dequantize)
            ),
            "bitsandbytes": lambda w, p, q: bnbF.dequantize_4bit(p, q),
            "ours": (lambda f: None if f is None else (lambda w, p, q: f(w)))(h.ours(nf4_dequantize)),
        }
        n = shape[0] * shape[1]
        moved = n // 2 + n * 2 + nf4.absmax.numel()  # packed read, bf16 written, scale bytes
        records += h.bench_case(
            NAME,
            label,
            make_inputs,
            providers,
            bytes_moved={"full": moved},
            modes=("full",),  # no backward exists: "full" is the forward, and is what summarize() reads
            headline=(label == shapes[-1][0]),
        )
    return records


if __name__ == "__main__":
    sys.exit(main_single(NAME, run, GOALS, BANDWIDTH_BOUND))
