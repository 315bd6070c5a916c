"""Fused SwiGLU product ``silu(gate) * up``, forward and backward Triton kernels.

Forward, elementwise with ``a = gate``, ``b = up``, ``sig = sigmoid(a)``::

    c = silu(a) * b = a * sig * b

Backward, given ``dc``::

    d silu(a)/da = sig + a * sig * (1 - sig) = sig * (1 + a * (1 - sig))
    da = dc * b * sig * (1 + a * (1 - sig))
    db = dc * a * sig

Nothing but ``gate`` and ``up`` is saved: the backward recomputes ``sig`` from ``gate``, which is
cheaper than storing ``silu(gate)`` (one more ``[N, I]`` tensor per layer under checkpointing).

Shapes: ``gate, up [..., I]``, same shape; rows may be strided (``gate, up = gate_up.chunk(2, -1)``
of a fused projection is read in place, no copy) as long as the last dimension has unit stride.
Output and gradients are new row-contiguous tensors in the input dtype.
Dtype policy: load, upcast to fp32 right after ``tl.load``, compute, store in the input dtype (one
rounding; the PyTorch version rounds after silu and again after the product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raytune_llm.kernels import reference
from raytune_llm.kernels._dispatch import kernel_store_dtype, triton_next_power_of_2, use_triton

__all__ = ["SwiGLUFunction", "swiglu", "swiglu_backward", "swiglu_forward"]

# Each program covers BLOCK columns of one row. 2048 bf16 elements with 8 warps is 8 per thread:
# one 128-bit vector load per tensor, enough bytes in flight per SM for a streaming kernel, and an
# Llama-8B row (I = 14336) splits into 7 programs, so even a few hundred tokens fill the 132 SMs.
_MAX_BLOCK = 2048


@triton.jit
def _swiglu_fwd_kernel(C_ptr, A_ptr, B_ptr, stride_c, stride_a, stride_b, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(A_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(C_ptr + row * stride_c + cols, c.to(C_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DA_ptr, DB_ptr, DC_ptr, A_ptr, B_ptr, stride_d, stride_dc, stride_a, stride_b, n_cols, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dc = tl.load(DC_ptr + row * stride_dc + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = dc * b * sig * (1.0 + a * (1.0 - sig))
    db = dc * silu
    tl.store(DA_ptr + row * stride_d + cols, da.to(DA_ptr.dtype.element_ty), mask=mask)
    tl.store(DB_ptr + row * stride_d + cols, db.to(DB_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., I]`` -> ``[N, I]`` with unit column stride (a view when the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _settings(n_cols: int) -> tuple[int, int]:
    block = min(triton_next_power_of_2(n_cols), _MAX_BLOCK)
    return block, (8 if block >= 2048 else 4)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel.

    Args:
        gate: ``[..., I]``.
        up: ``[..., I]``.

    Returns:
        ``silu(gate) * up``, row-contiguous, in ``gate.dtype``.
    """
    A, B = _as_rows(gate), _as_rows(up)
    n_rows, n_cols = A.shape
    C = torch.empty((n_rows, n_cols), dtype=kernel_store_dtype(gate.dtype), device=gate.device)
    BLOCK, num_warps = _settings(n_cols)
    if C.numel():
        grid = (n_rows, triton.cdiv(n_cols, BLOCK))
        _swiglu_fwd_kernel[grid](
            C, A, B, C.stride(0), A.stride(0), B.stride(0), n_cols, BLOCK=BLOCK, num_warps=num_warps
        )
    return C.to(gate.dtype).view(gate.shape)


def swiglu_backward(dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel (recomputes ``sigmoid(gate)``).

    Args:
        dc: upstream gradient, shape of ``gate``.
        gate: forward input.
        up: forward input.

    Returns:
        ``(d gate, d up)``, row-contiguous, in the inputs' dtypes.
    """
    A, B, DC = _as_rows(gate), _as_rows(up), _as_rows(dc)
    n_rows, n_cols = A.shape
    DA = torch.empty((n_rows, n_cols), dtype=kernel_store_dtype(gate.dtype), device=gate.device)
    DB = torch.empty((n_rows, n_cols), dtype=kernel_store_dtype(up.dtype), device=up.device)
    BLOCK, num_warps = _settings(n_cols)
    if DA.numel():
        grid = (n_rows, triton.cdiv(n_cols, BLOCK))
        _swiglu_bwd_kernel[grid](
            DA,
            DB,
            DC,
            A,
            B,
            DA.stride(0),
            DC.stride(0),
            A.stride(0),
            B.stride(0),
            n_cols,
            BLOCK=BLOCK,
            num_warps=num_warps,
        )
    return DA.to(gate.dtype).view(gate.shape), DB.to(up.dtype).view(up.shape)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dc, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation product ``silu(gate) * up``.

    Runs the Triton kernels on CUDA or under ``TRITON_INTERPRET=1``, otherwise ``reference.swiglu``.

    Args:
        gate: gate projection output ``[..., I]``.
        up: up projection output, same shape and dtype.

    Returns:
        ``silu(gate) * up`` in the inputs' dtype.

    Raises:
        ValueError: when shapes, dtypes or devices differ.
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {list(gate.shape)} and up {list(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}; cast one of them")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate on {gate.device} but up on {up.device}")
    if gate.dim() == 0:
        raise ValueError("swiglu: inputs must have at least one dimension")
    if not use_triton(gate, up):
        return reference.swiglu(gate, up)
    return SwiGLUFunction.apply(gate, up)
