"""Fused RMSNorm (Llama convention), forward and backward Triton kernels.

Forward, per row ``x`` of width ``H`` (all arithmetic in fp32, one rounding to the input dtype)::

    r    = rsqrt(mean(x^2) + eps)            # saved, one fp32 per row
    xh   = x * r
    y    = w * xh

Backward, given ``dy`` (write ``g = dy * w``)::

    dy_j/dx_i = w_j * (delta_ij * r + x_j * dr/dx_i),   dr/dx_i = -r^3 * x_i / H
    dx_i = r * g_i - r^3 * x_i / H * sum_j g_j x_j
         = r * (g_i - xh_i * mean_j(g_j * xh_j))
    dw_j = sum over rows of dy_j * xh_j

The backward recomputes ``xh`` from ``x`` and the saved ``r`` (one fp32 per row instead of a saved
``[N, H]`` tensor). ``dw`` is reduced in two steps: each of ``P`` programs walks a contiguous band
of rows and keeps its partial sum in fp32 registers, then a ``[P, H]`` sum in torch finishes it
(``P`` = 2 per SM on CUDA, see ``_num_programs``); on CUDA the band loop is software-pipelined (the next
row's loads are in flight while this row reduces).

With a decoder layer's residual stream (`add_rms_norm`, `rms_norm_residual`) the kernels take one more operand:
the forward reads ``a`` besides ``x``, writes ``h = x + a`` (rounded to the input dtype, as torch's add) and
normalises ``h``; the backward reads the residual's own gradient and adds it to ``dx`` (``dx`` rounded first, then
the sum rounded, as autograd's accumulation); the same bits. One [N, H] pass fewer in the forward (the norm's read
of ``h``) and two in the backward (the norm's write of its own ``dx`` and the add's read of it). Measured on the H200 with
the value-less recompute add of `models.checkpointing.residual_add` (session 13; a synthetic Llama-3.1-8B at 4x2048
as a CUDA graph, one alternation of 6-8 steps per setting): 633.99 -> 628.03 ms and 606.19 -> 602.49 ms on two
machines, within the steps' own spread on the second.

Shapes: ``x [..., H]``, ``w [H]``; output ``[..., H]`` in ``x.dtype``; ``dw`` in ``w.dtype``.
Dtype policy: load, upcast to fp32 right after ``tl.load`` (the CPU interpreter gets bf16
reductions wrong, and fp32 is what Llama computes in), store in the tensor's own dtype. Unlike
``LlamaRMSNorm``, which rounds ``xh`` to bf16 before multiplying by ``w``, the product is formed in
fp32 and rounded once, so it is at least as close to the fp32 result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from raytune_llm.kernels import reference
from raytune_llm.kernels._dispatch import interpret_mode, kernel_store_dtype, row_block_settings, use_triton
from raytune_llm.kernels._rounding import rne_bf16

__all__ = [
    "RMSNormFunction",
    "ResidualRMSNormFunction",
    "add_rms_norm",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_forward",
    "rms_norm_residual",
]


@triton.jit
def _rms_norm_fwd_kernel(
    Y_ptr,
    X_ptr,
    W_ptr,
    RSTD_ptr,
    A_ptr,
    H_ptr,
    stride_y,
    stride_x,
    stride_a,
    stride_h,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    HAS_ADD: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        # h = x + a rounded to the input dtype, as torch's add would; the norm reads the rounded h.
        a = tl.load(A_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        x = x + a
        if RNE_BF16:
            x = rne_bf16(x)
        x = x.to(X_ptr.dtype.element_ty).to(tl.float32)
        tl.store(H_ptr + row * stride_h + cols, x.to(H_ptr.dtype.element_ty), mask=mask)
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD_ptr + row, rstd)
    y = x * rstd * w
    tl.store(Y_ptr + row * stride_y + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_rows(
    DX_ptr,
    DY_ptr,
    X_ptr,
    RSTD_ptr,
    DR_ptr,
    w,
    cols,
    mask,
    rows,
    row_ok,
    stride_dx,
    stride_dy,
    stride_x,
    stride_dr,
    n_cols,
    HAS_RES: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """dx for a ``[ROWS, BLOCK]`` tile of rows (plus the residual's gradient, ``HAS_RES``); returns the tile's
    ``dy * xh`` summed over its rows."""
    m = row_ok[:, None] & mask[None, :]
    x = tl.load(X_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY_ptr + rows[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD_ptr + rows, mask=row_ok, other=0.0)
    xh = x * rstd[:, None]
    g = dy * w[None, :]
    dx = rstd[:, None] * (g - xh * (tl.sum(g * xh, axis=1) / n_cols)[:, None])
    if HAS_RES:
        # autograd's sum of the two gradients of x: each rounded to the input dtype first, then added and rounded
        dr = tl.load(DR_ptr + rows[:, None] * stride_dr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if RNE_BF16:
            dx = rne_bf16(dx)
        dx = dx.to(X_ptr.dtype.element_ty).to(tl.float32) + dr
    tl.store(DX_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(DX_ptr.dtype.element_ty), mask=m)
    return tl.sum(dy * xh, axis=0)


@triton.jit
def _rms_norm_bwd_kernel(
    DX_ptr,
    DW_PART_ptr,
    DY_ptr,
    X_ptr,
    W_ptr,
    RSTD_ptr,
    DR_ptr,
    stride_dx,
    stride_dy,
    stride_x,
    stride_dr,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    STAGES: tl.constexpr,
    HAS_RES: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    r = tl.arange(0, ROWS)
    if STAGES > 0:
        # Software-pipelined (GPU): the next tile's loads are issued while this one reduces and stores.
        for i in tl.range(0, rows_per_program, ROWS, num_stages=STAGES):
            rows = row_start + i + r
            row_ok = (rows < n_rows) & (i + r < rows_per_program)
            dw_acc += _rms_norm_bwd_rows(
                DX_ptr, DY_ptr, X_ptr, RSTD_ptr, DR_ptr, w, cols, mask, rows, row_ok, stride_dx, stride_dy, stride_x,
                stride_dr, n_cols, HAS_RES, RNE_BF16,
            )  # fmt: skip
    else:
        # A while loop with a row mask instead of range(row_start, min(...)): triton 3.6's interpreter
        # calls int() on a 1-element array for range() over a runtime bound, which numpy 2.4 rejects;
        # the last band's few masked rows cost nothing.
        i = 0
        while i < rows_per_program:
            rows = row_start + i + r
            row_ok = (rows < n_rows) & (i + r < rows_per_program)
            i += ROWS
            dw_acc += _rms_norm_bwd_rows(
                DX_ptr, DY_ptr, X_ptr, RSTD_ptr, DR_ptr, w, cols, mask, rows, row_ok, stride_dx, stride_dy, stride_x,
                stride_dr, n_cols, HAS_RES, RNE_BF16,
            )  # fmt: skip
    tl.store(DW_PART_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` -> ``[N, H]`` with unit column stride (a copy only when the layout needs one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# Backward launch settings: bands per SM (CUDA), rows per loop iteration, software-pipeline stages (0: a
# plain loop; CUDA only, the interpreter cannot run tl.range over a runtime bound). Chosen by
# bench/kernels/sweep_rms_norm_bwd.py on the H200 (bench/results/rms_norm_bwd_sweep_h200_20261128.json):
# 2 bands per SM with a 3-stage pipeline moved 0.697 / 0.766 of copy bandwidth at 8192 x 4096 / 8192, against
# 0.617 / 0.596 for 4 bands and a plain loop; tiles of 2 or 4 rows were slower (4 rows x 8192 do not fit
# shared memory with 3 stages).
_BWD = {"per_sm": 2, "rows": 1, "stages": 3}


def _num_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # More than Liger's 1 band per SM: each band walks its rows one after another, so a lone program
        # per SM leaves the memory pipe idle between rows; 2 resident pipelined programs hide that latency
        # (see _BWD). Bands of at least 8 rows keep the [P, H] fp32 partials small (8192 x 4096: 264
        # partial rows, 4.3 MB against 201 MB moved).
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(_BWD["per_sm"] * sms, triton.cdiv(n_rows, 8)))
    # Interpreter: programs run one after another, so a few bands are as fast as many.
    return max(1, min(n_rows, 4))


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernel.

    Args:
        x: ``[..., H]`` activations.
        weight: ``[H]`` scale.
        eps: variance epsilon.
        add: optional ``[..., H]`` summand: the kernel normalises ``h = x + add`` (rounded to ``x.dtype``, as
            torch's add) and writes ``h`` too (another dtype than ``x``'s, or fp32: torch's add, then the kernel).

    Returns:
        ``(y [..., H] in x.dtype, rstd [N] fp32)``; with ``add``: ``(h, y, rstd)``.
    """
    X = _as_rows(x)
    n_rows, n_cols = X.shape
    store = kernel_store_dtype(x.dtype)
    Y = torch.empty((n_rows, n_cols), dtype=store, device=x.device)
    RSTD = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    A = H = None
    if add is not None:
        _check_summand(x, add)
        if not _fuse_adds(x) or add.dtype != x.dtype:
            h = x + add
            return (h, *rms_norm_forward(h, weight, eps))
        A = _as_rows(add)
        H = torch.empty((n_rows, n_cols), dtype=store, device=x.device)
    BLOCK, num_warps = row_block_settings(n_cols)
    if n_rows > 0:
        _rms_norm_fwd_kernel[(n_rows,)](
            Y,
            X,
            weight,
            RSTD,
            X if A is None else A,
            Y if H is None else H,
            Y.stride(0),
            X.stride(0),
            0 if A is None else A.stride(0),
            0 if H is None else H.stride(0),
            n_cols,
            eps,
            BLOCK=BLOCK,
            HAS_ADD=A is not None,
            RNE_BF16=_rne(x),
            num_warps=num_warps,
        )
    y = Y.to(x.dtype).view(x.shape)
    return (y, RSTD) if H is None else (H.to(x.dtype).view(x.shape), y, RSTD)


def _fuse_adds(x: torch.Tensor) -> bool:
    """Whether the residual add runs inside the kernel. Not for fp32: there the GPU compiler contracts the backward's
    last product and the added gradient into one FMA (one rounding fewer than autograd's add; the H200 showed the
    difference), and nothing trains in fp32 on the GPU; the add then runs in torch, as autograd's would."""
    return x.dtype != torch.float32


def _rne(x: torch.Tensor) -> bool:
    """Whether a kernel rounding to ``x.dtype`` inside must round the bits itself (bf16 under the interpreter)."""
    return interpret_mode() and x.dtype == torch.bfloat16


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    need_dw: bool = True,
    residual_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel.

    Args:
        dy: upstream gradient, shape of ``x``.
        x: the forward input.
        weight: ``[H]`` scale.
        rstd: ``[N]`` fp32 from :func:`rms_norm_forward`.
        need_dw: whether to return the weight gradient.
        residual_grad: optional gradient ``x`` also receives around the norm (the residual stream's): added to
            ``dx`` inside the kernel, as autograd would add the two (each in ``x.dtype``, summed, rounded).

    Returns:
        ``(dx in x.dtype, dw in weight.dtype or None)``.
    """
    if residual_grad is not None and not _fuse_adds(x):
        dx, dw = rms_norm_backward(dy, x, weight, rstd, need_dw)
        return dx + residual_grad.to(x.dtype), dw
    X = _as_rows(x)
    DY = _as_rows(dy)
    DR = None if residual_grad is None else _as_rows(residual_grad.to(x.dtype))
    n_rows, n_cols = X.shape
    DX = torch.empty((n_rows, n_cols), dtype=kernel_store_dtype(x.dtype), device=x.device)
    P = _num_programs(n_rows, x.device)
    # Zeros only matter for an empty batch (no program then writes its partial row).
    DW_PART = (torch.empty if n_rows else torch.zeros)((P, n_cols), dtype=torch.float32, device=x.device)
    BLOCK, num_warps = row_block_settings(n_cols)
    # The backward keeps x, dy, w and the dw accumulator live: ptxas (triton 3.6, sm_90) gives it 125
    # registers at BLOCK 8192 / 16 warps, i.e. one 16-warp block per SM; at 32 warps it needs 60, so one
    # block holds 32 warps and hides twice the latency. At 4096 / 8 warps (128 registers) two blocks fit.
    if BLOCK >= 8192:
        num_warps = 32
    rows, stages = _BWD["rows"], _BWD["stages"]
    # The pipeline keeps (stages - 1) tiles of x and dy in shared memory: 3 stages of bf16 rows fit up to
    # 8192 wide (2 x 8192 x 4 B = 64 KiB per stage pair); wider or fp32 rows fall back to the plain loop
    # rather than fail to compile (228 KiB per SM on the H100/H200). A residual gradient adds a third row.
    width = X.element_size() + DY.element_size() + (0 if DR is None else DR.element_size())
    if interpret_mode() or x.device.type != "cuda":
        stages = 0
    elif stages and (stages - 1) * rows * BLOCK * width > 160 * 1024:
        stages = 0
    if n_rows > 0:
        _rms_norm_bwd_kernel[(P,)](
            DX,
            DW_PART,
            DY,
            X,
            weight,
            rstd,
            DY if DR is None else DR,
            DX.stride(0),
            DY.stride(0),
            X.stride(0),
            0 if DR is None else DR.stride(0),
            n_rows,
            n_cols,
            triton.cdiv(n_rows, P),
            BLOCK=BLOCK,
            ROWS=rows,
            STAGES=stages,
            HAS_RES=DR is not None,
            RNE_BF16=_rne(x),
            num_warps=num_warps,
        )
    dw = DW_PART.sum(0).to(weight.dtype) if need_dw else None
    return DX.to(x.dtype).view(x.shape), dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves ``x``, ``w`` and the per-row ``rstd``; recomputes ``xh`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd, need_dw=ctx.needs_input_grad[1])
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: ``w * x * rsqrt(mean(x^2) + eps)``, in ``x.dtype``.

    Runs the Triton kernels on CUDA or under ``TRITON_INTERPRET=1``, otherwise ``reference.rms_norm``.

    Args:
        x: activations ``[..., H]``.
        weight: scale ``[H]``.
        eps: variance epsilon.

    Returns:
        Normalised activations, shape and dtype of ``x``.

    Raises:
        ValueError: when ``weight`` is not ``[H]`` or the devices differ.
    """
    _check(x, weight)
    if not use_triton(x, weight):
        return reference.rms_norm(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}] to match x's last dim, got {list(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device} but weight on {weight.device}")


class ResidualRMSNormFunction(torch.autograd.Function):
    """A norm on a decoder layer's residual stream: ``(h, rms_norm(h))`` with ``h = x + a`` in one kernel, or with
    ``a`` None ``h = x`` (a view). Saves ``h``, ``w`` and ``rstd``. Backward receives ``h``'s own gradient (the
    residual stream's) with the norm's and returns their sum, formed inside the norm's backward kernel, for ``x``
    (and ``a``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor | None, weight: torch.Tensor, eps: float):
        if a is None:
            y, rstd = rms_norm_forward(x, weight, eps)
            h = x
        else:
            h, y, rstd = rms_norm_forward(x, weight, eps, add=a)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_a = a is not None
        ctx.set_materialize_grads(False)  # a gradient that never came stays None, no [N, H] of zeros
        return (h.view_as(h) if a is None else h), y

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: torch.Tensor | None, dy: torch.Tensor | None):
        h, weight, rstd = ctx.saved_tensors
        dx = dh
        dw = None
        if dy is not None:
            dx, dw = rms_norm_backward(dy, h, weight, rstd, need_dw=ctx.needs_input_grad[2], residual_grad=dh)
        return dx, (dx if ctx.has_a else None), dw, None


def _check_summand(x: torch.Tensor, a: torch.Tensor) -> None:
    if a.shape != x.shape:
        raise ValueError(f"add_rms_norm: the summands differ in shape: {list(x.shape)} and {list(a.shape)}")


def add_rms_norm(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's residual add and the RMSNorm after it: ``h = x + a``, ``y = rms_norm(h)``.

    One kernel each way instead of an add kernel and a norm kernel: the forward reads ``x`` and ``a`` and writes
    ``h`` and ``y`` (the norm's re-read of ``h`` saved); the backward adds ``h``'s own gradient to the norm's inside
    the norm's backward (the norm's write of its own ``dx`` and the add's read of it saved). Bit for bit what ``x + a`` followed by
    :func:`rms_norm` gives, in both directions. Summands of different dtypes take that separate path (torch's
    promotion).

    Returns:
        ``(h, y)``.

    Raises:
        ValueError: as :func:`rms_norm`, or when ``x`` and ``a`` differ in shape.
    """
    _check(x, weight)
    _check_summand(x, a)
    if a.dtype != x.dtype or not use_triton(x, a, weight):
        h = x + a
        return h, rms_norm(h, weight, eps)
    return ResidualRMSNormFunction.apply(x, a, weight, eps)


def rms_norm_residual(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, rms_norm(x))`` where ``x`` also feeds a residual add: the two gradients of ``x`` are summed inside the
    norm's backward kernel instead of by an add kernel after it. Bit for bit :func:`rms_norm` otherwise.

    Raises:
        ValueError: as :func:`rms_norm`.
    """
    _check(x, weight)
    if not use_triton(x, weight):
        return x, reference.rms_norm(x, weight, eps)
    return ResidualRMSNormFunction.apply(x, None, weight, eps)
