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
- ``embedding``: ``F.embedding`` of the ids on the table's device, moved to the ids' device; an id outside
  the table gives a row of NaN, as the kernel does (``F.embedding`` raises).
- ``fused_linear_cross_entropy``: full logits ``hidden @ weight.T`` upcast to fp32, summed
  cross-entropy over tokens whose label is not ``ignore_index``, divided by their count (0.0 when
  no token counts; ``F.cross_entropy`` would return NaN there). ``chunk_size`` is accepted for
  signature parity and ignored.

The LoRA / NF4 references live in their own section at the bottom of this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["embedding", "fused_linear_cross_entropy", "rms_norm", "rope", "rotate_half", "swiglu"]


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


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    halves_equal: bool = False,
    values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding on Q and K (HF ``apply_rotary_pos_emb``, ``unsqueeze_dim=1``).

    Args:
        q: queries ``[B, Hq, S, D]``.
        k: keys ``[B, Hk, S, D]``.
        cos: ``[B, S, D]`` cosines, gathered by position ids.
        sin: ``[B, S, D]`` sines, gathered by position ids.
        halves_equal: the kernel's read-half-the-table hint; the reference always reads the whole table.
        values: the kernel's no-values hint (`kernels.rope.rope`); the reference always computes them.

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


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows of a frozen ``[V, H]`` table for integer ``ids``, on the ids' device.

    Args:
        ids: integer token ids ``[...]``.
        table: ``[V, H]`` embedding weight (on any device).

    Returns:
        ``[..., H]`` in ``table.dtype`` on ``ids.device``; rows of NaN where an id is outside ``[0, V)``.
    """
    idx = ids.to(table.device)
    valid = (idx >= 0) & (idx < table.shape[0])
    rows = F.embedding(torch.where(valid, idx, torch.zeros_like(idx)), table.detach())
    rows = rows.masked_fill(~valid[..., None], float("nan"))
    return rows.to(ids.device)


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


# ---- LoRA / NF4 ----
# References for kernels/nf4.py and kernels/lora.py. They take the same NF4Weight / LoRAWeight
# NamedTuples by duck typing (fields read by name), so this file still imports nothing of ours.

__all__ += ["lora_linear", "lora_mlp", "lora_qkv", "nf4_dequantize"]


def nf4_dequantize(w, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4 dequantization in plain torch, bit-exact against ``bitsandbytes.functional.dequantize_4bit``.

    Args:
        w: an ``NF4Weight`` (packed uint8, absmax, nested, code, shape, blocksize, dtype).
        dtype: output dtype (default ``w.dtype``).

    Returns:
        ``Tensor[w.shape]``: ``code[q_i] * absmax[i // blocksize]`` in fp32, cast once to ``dtype``.
    """
    shape = torch.Size(w.shape)
    n = shape.numel()
    packed = w.packed.reshape(-1)
    # High nibble = even element, low nibble = odd element; an odd n leaves one padding nibble.
    q = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)[:n].long()
    absmax = w.absmax.reshape(-1)
    if w.nested is not None:
        nb = absmax.numel()
        scale2 = w.nested.absmax.float().repeat_interleave(w.nested.blocksize)[:nb]
        # Two roundings (mul, then add) as bitsandbytes does; never an FMA.
        absmax = w.nested.code.float()[absmax.long()] * scale2
        absmax = absmax + w.nested.offset.float().reshape(())
    scale = absmax.float().repeat_interleave(w.blocksize)[:n]
    return (w.code.float()[q] * scale).to(dtype or w.dtype).reshape(shape)


def _lora_base(base, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight ``[out, in]`` in ``dtype`` (NF4 dequantized), never receiving a gradient."""
    if callable(base):  # kernels.lora.LoRAWeight: resolved at use
        base = base()
    if isinstance(base, torch.Tensor):
        return base.detach().to(dtype)
    return nf4_dequantize(base, dtype)


def _lora_proj(x: torch.Tensor, w) -> torch.Tensor:
    """``x @ W^T + scaling * (x @ A^T) @ B^T`` in ``x.dtype`` (A and B cast to it, grads flow back)."""
    a = w.A.to(x.dtype)
    b = w.B.to(x.dtype)
    return x @ _lora_base(w.base, x.dtype).t() + w.scaling * ((x @ a.t()) @ b.t())


def lora_linear(x: torch.Tensor, w) -> torch.Tensor:
    """One LoRA projection (the attention output ``O``).

    Args:
        x: activations ``[..., in]``.
        w: a ``LoRAWeight`` (base ``[out, in]`` tensor or NF4Weight, A ``[r, in]``, B ``[out, r]``, scaling).

    Returns:
        ``x @ W^T + scaling * (x @ A^T) @ B^T``, ``[..., out]`` in ``x.dtype``.
    """
    return _lora_proj(x, w)


def lora_qkv(x: torch.Tensor, q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q, K and V LoRA projections of the same input.

    Args:
        x: activations ``[..., hidden]``.
        q: ``LoRAWeight`` of the query projection.
        k: ``LoRAWeight`` of the key projection.
        v: ``LoRAWeight`` of the value projection.

    Returns:
        ``(Q, K, V)``, each ``lora_linear(x, ·)``.
    """
    return _lora_proj(x, q), _lora_proj(x, k), _lora_proj(x, v)


def lora_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """The SwiGLU MLP with LoRA on all three projections: ``down(silu(gate(x)) * up(x))``.

    Args:
        x: activations ``[..., hidden]``.
        gate: ``LoRAWeight`` ``[inter, hidden]``.
        up: ``LoRAWeight`` ``[inter, hidden]``.
        down: ``LoRAWeight`` ``[hidden, inter]``.

    Returns:
        ``[..., hidden]`` in ``x.dtype``; the activation is computed as ``LlamaMLP`` does.
    """
    return _lora_proj(F.silu(_lora_proj(x, gate)) * _lora_proj(x, up), down)
