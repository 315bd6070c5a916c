"""Fused LoRA MLP / QKV / O against the torch reference, torch.compile and a PEFT-style fp32 baseline.

Providers, all on the same bf16 activations and fp32 master adapters (as PEFT trains them):

- ``torch``: ``reference.lora_*`` eager (adapters cast to bf16, unfused).
- ``torch_compile``: the same reference under ``torch.compile``.
- ``peft_fp32``: what PEFT does: base GEMM in bf16 (an NF4 base dequantized by bitsandbytes first,
  as ``bnb.matmul_4bit`` does in training), ``x`` cast to fp32 for the adapter matmuls (no tensor
  cores), the sum promoted to fp32 and cast back (ANCHORS.md: ~55% of the standard QLoRA step).
- ``ours``: ``kernels.lora``.

Shapes: Llama-3.1-8B (hidden 4096, intermediate 14336, 32/8 heads of 128) at 4x2048 tokens, r=16,
dense bf16 and NF4 (double quant) bases; ``--tiny`` runs hidden 24 / intermediate 40 on the CPU.
Compute-bound: ``extra["tflops"]`` is the forward (2 GEMM flops per MAC) or forward + input-grad
backward work divided by the time.

    python bench/kernels/bench_lora.py
    TRITON_INTERPRET=1 python bench/kernels/bench_lora.py --tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ for _harness
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root for raytune_llm

import bitsandbytes.functional as bnbF  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _harness import Harness, Record, main_single  # noqa: E402

from raytune_llm.kernels import reference  # noqa: E402
from raytune_llm.kernels.lora import LoRAWeight, lora_linear, lora_mlp, lora_qkv  # noqa: E402
from raytune_llm.kernels.nf4 import NF4Weight  # noqa: E402

NAME = "lora"
GOALS = {"speedup_vs_torch": ">= 1.0", "speedup_vs_peft_fp32": ">= 1.5 (extra['speedup_vs_peft_fp32'])"}
BANDWIDTH_BOUND = False
RANK = 16


def _peft_proj(x: torch.Tensor, w: LoRAWeight, bnb_pair) -> torch.Tensor:
    """PEFT's LoRA Linear forward with fp32 adapters (lora_dropout=0)."""
    base = bnbF.dequantize_4bit(*bnb_pair).to(x.dtype) if bnb_pair is not None else w.base
    result = F.linear(x, base)
    lora = F.linear(F.linear(x.to(w.A.dtype), w.A), w.B) * w.scaling
    return (result + lora).to(x.dtype)


def _dims(h: Harness):
    if h.tiny:
        return {"tokens": 7, "hidden": 24, "inter": 40, "kv": 12, "rank": 4}
    return {"tokens": 4 * 2048, "hidden": 4096, "inter": 14336, "kv": 1024, "rank": RANK}


def _projections(op: str, d: dict) -> list[tuple[int, int]]:
    hid, inter, kv = d["hidden"], d["inter"], d["kv"]
    return {
        "mlp": [(inter, hid), (inter, hid), (hid, inter)],
        "qkv": [(hid, hid), (kv, hid), (kv, hid)],
        "o": [(hid, hid)],
    }[op]


def _flops(op: str, d: dict, mode: str) -> float:
    """GEMM flops: forward 2*N*(out*in + r*(in+out)) per projection; backward adds dX and dA/dB."""
    n, r = d["tokens"], d["rank"]
    fwd = sum(2 * n * (o * i + r * (i + o)) for o, i in _projections(op, d))
    bwd = sum(2 * n * (o * i + 2 * r * (i + o)) for o, i in _projections(op, d))
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def run(h: Harness) -> list[Record]:
    """Measure every provider for MLP, QKV and O, dense and NF4 bases, in every mode.

    Args:
        h: the harness.

    Returns:
        The records (``extra`` holds TFLOP/s and, for ours, the speed-up over ``peft_fp32``).
    """
    d = _dims(h)
    records: list[Record] = []
    cases = [(op, kind) for op in ("mlp", "qkv", "o") for kind in ("nf4", "dense")]
    for op, kind in cases:
        label = f"{op}-{kind} {d['tokens']}x{d['hidden']} r{d['rank']}"
        bases, pairs = [], []
        for out_f, in_f in _projections(op, d):
            w = (torch.randn(out_f, in_f, device=h.device) / in_f**0.5).to(h.dtype)
            if kind == "nf4":
                packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                bases.append(NF4Weight.from_bnb(packed, qs))
                pairs.append((packed, qs))
            else:
                bases.append(w)
                pairs.append(None)
            del w
        shapes = _projections(op, d)

        def make_inputs(shapes=shapes):
            x = torch.randn(d["tokens"], shapes[0][1], device=h.device, dtype=h.dtype, requires_grad=True)
            ad = []
            for out_f, in_f in shapes:  # fp32 master adapters, as PEFT keeps them
                ad.append((torch.randn(d["rank"], in_f, device=h.device) / in_f**0.5).requires_grad_())
                ad.append((torch.randn(out_f, d["rank"], device=h.device) * 0.01).requires_grad_())
            return (x, *ad)

        def bind(fn, bases=bases):
            if fn is None:
                return None
            return lambda x, *ad: fn(x, *(LoRAWeight(b, a, bb, 2.0) for b, a, bb in zip(bases, ad[0::2], ad[1::2])))

        def peft(x, *ad, bases=bases, pairs=pairs, op=op):
            ws = [LoRAWeight(b, a, bb, 2.0) for b, a, bb in zip(bases, ad[0::2], ad[1::2])]
            if op == "mlp":
                g, u = (_peft_proj(x, w, p) for w, p in zip(ws[:2], pairs[:2]))
                return _peft_proj(F.silu(g) * u, ws[2], pairs[2])
            outs = tuple(_peft_proj(x, w, p) for w, p in zip(ws, pairs))
            return outs if op == "qkv" else outs[0]

        ours_fn = {"mlp": lora_mlp, "qkv": lora_qkv, "o": lora_linear}[op]
        ref_fn = {"mlp": reference.lora_mlp, "qkv": reference.lora_qkv, "o": reference.lora_linear}[op]
        providers = {
            "torch": bind(ref_fn),
            "torch_compile": bind(h.compile(ref_fn)),
            "peft_fp32": peft,
            "ours": bind(h.ours(ours_fn)),
        }
        recs = h.bench_case(NAME, label, make_inputs, providers, headline=(op, kind) == ("mlp", "nf4"))
        by = {(r.provider, r.mode): r.ms for r in recs if r.ms is not None}
        for r in recs:
            if r.ms is not None:
                r.extra["tflops"] = round(_flops(op, d, r.mode) / (r.ms * 1e-3) / 1e12, 2)
            if r.provider == "ours" and r.ms is not None and ("peft_fp32", r.mode) in by:
                r.extra["speedup_vs_peft_fp32"] = round(by[("peft_fp32", r.mode)] / r.ms, 3)
        records += recs
        del bases, pairs
        if h.device.type == "cuda":
            torch.cuda.empty_cache()
    return records


if __name__ == "__main__":
    sys.exit(main_single(NAME, run, GOALS, BANDWIDTH_BOUND))
