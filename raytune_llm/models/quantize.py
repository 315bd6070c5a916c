"""NF4 quantization through bitsandbytes: the loading config, and one Linear quantized as it is built.

The base model is quantized by bitsandbytes itself (QLoRA's NF4 with double quantization, blocksize 64),
so the stored layout is exactly what transformers + PEFT + bitsandbytes would hold and the fused NF4
dequant kernel reads it through `NF4Weight.from_bnb`. `quant_storage` matters under DeepSpeed ZeRO-3:
the packed storage dtype must equal the dtype ZeRO partitions (bf16) or weights silently become random
(DESIGN.md, "ZeRO-3 + QLoRA pitfalls").
"""

from __future__ import annotations

from typing import Any

import torch

QUANT_MODES = (None, "nf4")


def check_quantize(quantize: str | None) -> None:
    """Validate the `quantize` argument.

    Raises:
        ValueError: anything but None or "nf4".
    """
    if quantize not in QUANT_MODES:
        raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")


def bnb_config(compute_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8, double_quant: bool = True) -> Any:
    """The BitsAndBytesConfig of QLoRA: NF4, double quantization (unless turned off), the given compute dtype.

    Args:
        compute_dtype: dtype bitsandbytes dequantizes to (bf16 on the GPU, fp32 in CPU tests).
        quant_storage: storage dtype of the packed 4-bit data (bf16 for ZeRO-3, uint8 otherwise).
        double_quant: quantize the block scales too (`quant.double_quant`).

    Returns:
        A `transformers.BitsAndBytesConfig`.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def quantize_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    device: torch.device | str,
    quant_storage: torch.dtype = torch.uint8,
    double_quant: bool = True,
) -> torch.nn.Module:
    """Build a frozen bitsandbytes NF4 Linear4bit (double quant unless turned off, blocksize 64) from a dense weight.

    The dense weight is quantized on `device` and may be freed by the caller right after, so a model
    built layer by layer never holds more than one dense Linear at a time.

    Args:
        weight: `[out, in]` dense weight (any device and float dtype).
        bias: `[out]` or None.
        compute_dtype: Linear4bit compute dtype; the weight is cast to it before quantizing, as
            transformers does when it loads a checkpoint in that dtype.
        device: where the quantized layer lives.
        quant_storage: packed storage dtype.
        double_quant: quantize the block scales too.

    Returns:
        A `bitsandbytes.nn.Linear4bit` on `device`.
    """
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            quant_storage=quant_storage,
        )
    param = bnb.nn.Params4bit(
        weight.detach().to(device=device, dtype=compute_dtype),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=quant_storage,
        module=layer,
    )
    # Params4bit quantizes on a move to a CUDA/XPU device; call its quantizer directly so the CPU works too.
    layer.weight = param._quantize(device)
    keep_nf4_layout(layer)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)
    return layer


def quantize_linear(
    linear: torch.nn.Linear,
    compute_dtype: torch.dtype,
    device: torch.device | str,
    quant_storage: torch.dtype = torch.uint8,
) -> torch.nn.Module:
    """Replace a dense Linear by a bitsandbytes NF4 Linear4bit holding the same (quantized) weight.

    Args:
        linear: the dense layer.
        compute_dtype: Linear4bit compute dtype.
        device: where the quantized layer lives.
        quant_storage: packed storage dtype.

    Returns:
        A frozen `bitsandbytes.nn.Linear4bit` on `device`.
    """
    return quantize_weight(linear.weight, linear.bias, compute_dtype, device, quant_storage)


def keep_nf4_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking NF4 weights in place on the CPU; returns how many modules it turned off.

    bitsandbytes 0.50 gives each `Linear4bit` a `support_avx512bf16_for_cpu` flag, true on CPUs with AVX512-BF16. With
    it, the first CPU forward in eval mode without grad (an evaluation pass) rewrites the weight into a CPU-only
    layout and from then on multiplies through an approximate bf16 kernel (about 1e-2 off `dequantize_4bit`). The
    weight then no longer is the NF4 tensor that training, ZeRO-3 partitioning (it becomes uint8) and the NF4 merge
    at export read. Seen on an AMD EPYC CPU with AVX512-BF16 in session 9; CPUs without it never take that path.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n
