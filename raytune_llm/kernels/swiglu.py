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
The output is a new row-contiguous tensor in the input dtype.

The backward writes ``d gate`` over ``gate`` and ``d up`` over ``up`` (as Liger-Kernel does; a saved
activation is dead after its one backward), so it allocates nothing, when both are intermediates
(not leaves), can be written in their layout, and do not overlap each other. It then bumps their
autograd version counters: a second backward through the same graph, or any other operation that
saved ``gate`` or ``up`` and runs its backward later, raises autograd's "modified by an inplace
operation" error instead of reading gradients as activations. Otherwise the gradients are new
tensors.
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

# Each program covers BLOCK columns of one row, with the warps that keep >= 8 values per thread (one 128-bit vector
# of bf16 per load at 8). Chosen by bench/kernels/sweep_swiglu.py on the H200, bf16, 8192 rows
# (bench/results/swiglu_sweep_h200_20261129.json; ms, Liger-Kernel beside):
#   forward, whole rows (BLOCK 16384) at 32 warps: 0.1662 at I = 14336 (Liger 0.1666; 0.1728 at the old 2048/8),
#     0.3340 in two blocks at I = 28672 (Liger 0.3442);
#   backward, 8192 at 16 warps: 0.2845 at 14336 (Liger 0.2836; whole rows 0.2981); at 28672, 4096 at 8 warps:
#     0.5751 (Liger 0.5666; 8192/16 0.5868).
# Overrides when set (the sweep tries alternatives): (BLOCK cap, warps).
_FWD: tuple[int, int] | None = None
_BWD: tuple[int, int] | None = None


def _default_bwd(n_cols: int) -> tuple[int, int]:
    return (8192, 16) if n_cols <= 16384 else (4096, 8)


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
    DA_ptr,
    DB_ptr,
    DC_ptr,
    A_ptr,
    B_ptr,
    stride_da,
    stride_db,
    stride_dc,
    stride_a,
    stride_b,
    n_cols,
    BLOCK: tl.constexpr,
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
    tl.store(DA_ptr + row * stride_da + cols, da.to(DA_ptr.dtype.element_ty), mask=mask)
    tl.store(DB_ptr + row * stride_db + cols, db.to(DB_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., I]`` -> ``[N, I]`` with unit column stride (a view when the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _settings(n_cols: int, setting: tuple[int, int]) -> tuple[int, int]:
    """(BLOCK, warps) for rows of ``n_cols``: the block is capped at the setting's width, and the warps shrink
    with it so each thread keeps at least 8 values (narrow rows, e.g. the tests' odd shapes)."""
    cap, warps = setting
    block = min(triton_next_power_of_2(n_cols), cap)
    return block, max(1, min(warps, block // 256))


def _writable_over(t: torch.Tensor, rows: torch.Tensor) -> bool:
    """Can the backward write a gradient over ``t`` (whose ``[N, I]`` row view is ``rows``)?

    ``t`` must be an intermediate and, when it is a view, so must the tensor it views (a leaf's storage,
    a parameter's say, is the user's); ``rows`` must be a view of it (not a copy), and under the
    interpreter bf16 is written through fp32 (see kernel_store_dtype).
    """
    owner = t if t._base is None else t._base
    return (
        not t.is_leaf
        and not owner.is_leaf
        and rows.data_ptr() == t.data_ptr()
        and kernel_store_dtype(t.dtype) == t.dtype
        and (rows.shape[0] <= 1 or rows.stride(0) >= rows.shape[1])
    )


def _disjoint(A: torch.Tensor, B: torch.Tensor) -> bool:
    """True when two ``[N, I]`` row views with unit column stride share no element.

    Views of different storages never do; on one storage (the two halves of a fused gate_up output)
    the rows must be equally strided and B's offset ``d`` from A (in elements) must keep every row of
    one clear of every row of the other: ``I <= |d| <= R - I`` for row stride ``R``.
    """
    if A.untyped_storage().data_ptr() != B.untyped_storage().data_ptr():
        return True
    n, cols = A.shape
    d = abs(B.data_ptr() - A.data_ptr()) // A.element_size()
    if n <= 1:
        return d >= cols
    return A.stride(0) == B.stride(0) and cols <= d <= A.stride(0) - cols


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
    BLOCK, num_warps = _settings(n_cols, _FWD or (16384, 32))
    if C.numel():
        grid = (n_rows, triton.cdiv(n_cols, BLOCK))
        _swiglu_fwd_kernel[grid](
            C, A, B, C.stride(0), A.stride(0), B.stride(0), n_cols, BLOCK=BLOCK, num_warps=num_warps
        )
    return C.to(gate.dtype).view(gate.shape)


def swiglu_backward(
    dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel (recomputes ``sigmoid(gate)``).

    Args:
        dc: upstream gradient, shape of ``gate``.
        gate: forward input.
        up: forward input.
        in_place: write the gradients over ``gate`` and ``up`` where they allow it (see the module
            docstring); the caller then owns the consequences for any other reader of them.

    Returns:
        ``(d gate, d up)`` in the inputs' dtypes: ``gate`` and ``up`` themselves when written in place,
        else new row-contiguous tensors.
    """
    A, B, DC = _as_rows(gate), _as_rows(up), _as_rows(dc)
    n_rows, n_cols = A.shape
    in_place = in_place and _writable_over(gate, A) and _writable_over(up, B) and _disjoint(A, B)
    if in_place:
        DA, DB = A, B
    else:
        DA = torch.empty((n_rows, n_cols), dtype=kernel_store_dtype(gate.dtype), device=gate.device)
        DB = torch.empty((n_rows, n_cols), dtype=kernel_store_dtype(up.dtype), device=up.device)
    BLOCK, num_warps = _settings(n_cols, _BWD or _default_bwd(n_cols))
    if DA.numel():
        grid = (n_rows, triton.cdiv(n_cols, BLOCK))
        _swiglu_bwd_kernel[grid](
            DA,
            DB,
            DC,
            A,
            B,
            DA.stride(0),
            DB.stride(0),
            DC.stride(0),
            A.stride(0),
            B.stride(0),
            n_cols,
            BLOCK=BLOCK,
            num_warps=num_warps,
        )
    if in_place:
        # Any later reader of the saved gate/up through autograd now fails loudly instead of reading gradients.
        torch.autograd.graph.increment_version(gate)
        torch.autograd.graph.increment_version(up)
        # Fresh views, not gate/up themselves: AccumulateGrad may then take a gradient that reaches a leaf as it
        # is, where the caller's own reference to gate would make it copy (measured: +0.2 ms, +448 MiB at 8192x14336).
        return DA.view(gate.shape), DB.view(up.shape)
    return DA.to(gate.dtype).view(gate.shape), DB.to(up.dtype).view(up.shape)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up only, and writes their gradients over them when it may."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dc, gate, up, in_place=True)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation product ``silu(gate) * up``.

    Runs the Triton kernels on CUDA or under ``TRITON_INTERPRET=1``, otherwise ``reference.swiglu``.
    The backward writes the gradients over ``gate`` and ``up`` when they are intermediates (module
    docstring): do not read them after the backward.

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
