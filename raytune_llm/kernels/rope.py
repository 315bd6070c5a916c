"""Fused rotary position embedding on Q and K together, in place, forward and backward Triton kernels.

Forward (HF ``apply_rotary_pos_emb`` with ``rotate_half``): split the head dimension ``D`` into
halves ``x = [x1, x2]`` and ``cos = [c1, c2]``, ``sin = [s1, s2]`` (HF's rotary embedding returns
``cat(freqs, freqs)``, so ``c1 == c2`` and ``s1 == s2``)::

    y = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

Backward: ``y`` is linear in ``x``, so ``dx = J^T dy`` with ``J = [[c1, -s1], [s2, c2]]`` per pair::

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1

which, with HF's equal halves, is the rotation by ``-theta``. cos and sin get no gradient (the
rotary table has no parameters).

Shapes: ``q [B, Hq, S, D]``, ``k [B, Hk, S, D]`` (any strides with a unit stride on ``D``, e.g. the
transposed view of a projection output), ``cos``/``sin`` ``[B, S, D]`` or ``[1, S, D]``, already
gathered by position ids that restart per packed example: each token reads its own row, so packing
needs nothing more. One program handles one token: all Q and K heads, so cos/sin are read once.
The forward writes into q and k (marked dirty for autograd) unless they are views that autograd
tracks (then into new tensors, see ``RoPEFunction``); the backward writes into the incoming gradients.
Dtype policy: load, upcast to fp32, rotate, store in q/k's dtype (one rounding; HF rounds three
times in bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raytune_llm.kernels import reference
from raytune_llm.kernels._dispatch import kernel_store_dtype, triton_next_power_of_2, use_triton

__all__ = ["RoPEFunction", "rope", "rope_backward", "rope_forward"]


@triton.jit
def _rope_load(in_ptr, stride_in_h, n_heads, d_off, d_mask, half, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < n_heads) & d_mask[None, :]
    p_in = in_ptr + h * stride_in_h + d_off[None, :]
    x1 = tl.load(p_in, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p_in + half, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _rope_store(
    out_ptr,
    stride_out_h,
    x1,
    x2,
    n_heads,
    c1,
    c2,
    s1,
    s2,
    d_off,
    d_mask,
    half,
    BLOCK_H: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < n_heads) & d_mask[None, :]
    p_out = out_ptr + h * stride_out_h + d_off[None, :]
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(p_out, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(p_out + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q_ptr,
    K_ptr,
    QO_ptr,
    KO_ptr,
    COS_ptr,
    SIN_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_kob,
    stride_koh,
    stride_kos,
    stride_cb,
    stride_cs,
    stride_sb,
    stride_ss,
    seq_len,
    n_q_heads,
    n_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
    HALVES_EQUAL: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    cos_row = COS_ptr + b * stride_cb + s * stride_cs
    sin_row = SIN_ptr + b * stride_sb + s * stride_ss
    c1 = tl.load(cos_row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if HALVES_EQUAL:  # HF's cat(freqs, freqs): the second halves repeat the first, half the table reads
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(cos_row + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_row + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    q_in = Q_ptr + b * stride_qb + s * stride_qs
    k_in = K_ptr + b * stride_kb + s * stride_ks
    q_out = QO_ptr + b * stride_qob + s * stride_qos
    k_out = KO_ptr + b * stride_kob + s * stride_kos
    # Both loads in flight before the first store (the compiler cannot move K's loads past Q's stores).
    q1, q2 = _rope_load(q_in, stride_qh, n_q_heads, d, d_mask, half, BLOCK_HQ)
    k1, k2 = _rope_load(k_in, stride_kh, n_k_heads, d, d_mask, half, BLOCK_HK)
    _rope_store(q_out, stride_qoh, q1, q2, n_q_heads, c1, c2, s1, s2, d, d_mask, half, BLOCK_HQ, BACKWARD)
    _rope_store(k_out, stride_koh, k1, k2, n_k_heads, c1, c2, s1, s2, d, d_mask, half, BLOCK_HK, BACKWARD)


# Warps per program when set (bench/kernels/sweep_rope.py tries the alternatives); None: the rule in _launch. One
# token per program: 2 or 4 tokens ran 3-10% slower (bench/results/rope_sweep_h200_20261129.json).
_NUM_WARPS: int | None = None


def _table(t: torch.Tensor, batch: int) -> tuple[torch.Tensor, int, int]:
    """cos/sin with a unit last stride, and its (batch, seq) strides; batch stride 0 broadcasts one table."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] == batch else 0), t.stride(1)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool,
    halves_equal: bool = False,
) -> None:
    """Rotate ``q, k`` into ``q_out, k_out`` (which may be ``q, k`` themselves: the kernel then works in place)."""
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    half = D // 2
    cos, scb, scs = _table(cos, B)
    sin, ssb, sss = _table(sin, B)
    BLOCK_D = triton_next_power_of_2(half)
    BLOCK_HQ = triton_next_power_of_2(Hq)
    BLOCK_HK = triton_next_power_of_2(Hk)
    # Work per program is (Hq + Hk) heads x D elements (Llama-8B: 40 x 128 = 5120 bf16 values). Measured on
    # the H200 (bench/kernels/sweep_rope.py), forward + backward, with Q's and K's loads issued first: 32 q heads
    # of 128 (q block 32 x 64 per half) ran 0.0894 ms at 8 warps, 0.0921 at 4; 64 q heads 0.1594 ms at 8, 0.1615
    # at 4 (bench/results/rope_sweep_h200_20261129_s6.json; loads interleaved with stores: 0.0907 / 0.1595 at 8).
    # Session 4, interleaved, found 2 and 16 warps slower at both.
    num_warps = _NUM_WARPS or (8 if BLOCK_HQ * BLOCK_D >= 2048 else 4)
    if B * S == 0:
        return
    _rope_kernel[(B * S,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        *q.stride()[:3],
        *k.stride()[:3],
        *q_out.stride()[:3],
        *k_out.stride()[:3],
        scb,
        scs,
        ssb,
        sss,
        S,
        Hq,
        Hk,
        half,
        BLOCK_HQ=BLOCK_HQ,
        BLOCK_HK=BLOCK_HK,
        BLOCK_D=BLOCK_D,
        BACKWARD=backward,
        HALVES_EQUAL=halves_equal,
        num_warps=num_warps,
    )


def _readable(t: torch.Tensor) -> bool:
    # The kernel indexes D with unit stride; anything else goes through a contiguous copy.
    return t.stride(-1) == 1


def _writable(t: torch.Tensor) -> bool:
    # Writing in place also needs no broadcast (stride-0) dimension aliasing elements, and under the
    # interpreter bf16 is written through fp32 (see kernel_store_dtype).
    return (
        _readable(t)
        and all(st != 0 or n == 1 for st, n in zip(t.stride(), t.shape))
        and kernel_store_dtype(t.dtype) == t.dtype
    )


def _rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool,
    in_place: bool,
    halves_equal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k; in place where the layout allows (copying back otherwise), else into new tensors."""
    qi = q if _readable(q) else q.contiguous()
    ki = k if _readable(k) else k.contiguous()

    def fresh(t: torch.Tensor) -> torch.Tensor:
        # In t's layout when it is dense (attention's q/k are [B, S, H, D] in memory, viewed [B, H, S, D]):
        # each token's heads stay one contiguous run, and attention gets q, k (and v) in one layout, so the
        # cuDNN kernels write their output in it too and the [B, S, H*D] result needs no copy.
        return torch.empty_like(t, dtype=kernel_store_dtype(t.dtype))

    # Laid out like the readable copies: the kernel writes D with unit stride.
    qo = q if in_place and _writable(q) else fresh(qi)
    ko = k if in_place and _writable(k) else fresh(ki)
    _launch(qi, ki, qo, ko, cos, sin, backward, halves_equal)
    if in_place:
        if qo is not q:
            q.copy_(qo)
        if ko is not k:
            k.copy_(ko)
        return q, k
    return qo.to(q.dtype), ko.to(k.dtype)


def rope_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    in_place: bool = True,
    halves_equal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward rotation.

    Args:
        q: ``[B, Hq, S, D]``.
        k: ``[B, Hk, S, D]``.
        cos: ``[B|1, S, D]``.
        sin: ``[B|1, S, D]``.
        in_place: write into q and k (True) or into new tensors (in q's and k's layout when dense).
        halves_equal: the caller vouches that ``cos[..., :D/2] == cos[..., D/2:]`` (and the same for
            ``sin``); the kernel then reads only the first halves.

    Returns:
        The rotated ``(q, k)``.
    """
    return _rotate(q, k, cos, sin, backward=False, in_place=in_place, halves_equal=halves_equal)


def rope_backward(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, halves_equal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the transposed rotation (rotation by -theta) on the gradients, in place where possible.

    Args:
        dq: gradient of the rotated q, ``[B, Hq, S, D]``.
        dk: gradient of the rotated k, ``[B, Hk, S, D]``.
        cos: ``[B|1, S, D]``.
        sin: ``[B|1, S, D]``.
        halves_equal: as in :func:`rope_forward`.

    Returns:
        ``(dq, dk)`` for the unrotated inputs.
    """
    return _rotate(dq, dk, cos, sin, backward=True, in_place=True, halves_equal=halves_equal)


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper; saves only cos and sin.

    The forward works in place (``mark_dirty``) unless q or k is a view: autograd refuses a Function
    that modifies a view in place and returns two tensors, and attention's q/k are views
    (``proj(x).view(B, S, H, D).transpose(1, 2)``). Then it writes new tensors of the same layout instead,
    which moves the same bytes (read q, write q') and lets the projection output be freed.
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        halves_equal: bool,
        values: bool = True,
    ):
        if not values:  # the graph alone: new tensors in q's and k's layouts, no kernel (see `rope`)
            q_out, k_out = (
                torch.empty_like(t) if _readable(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device)
                for t in (q, k)
            )
            ctx.save_for_backward(cos, sin)
            ctx.halves_equal = halves_equal
            return q_out, k_out
        in_place = q._base is None and k._base is None
        q_out, k_out = rope_forward(q, k, cos, sin, in_place=in_place, halves_equal=halves_equal)
        if in_place:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.halves_equal = halves_equal
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq: torch.Tensor | None, dk: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        if dq is None and dk is None:
            return None, None, None, None, None, None
        # Autograd passes None for an unused output; a zero-head stand-in keeps one launch path.
        other = dq if dq is not None else dk
        empty = other.new_empty(other.shape[0], 0, other.shape[2], other.shape[3])
        dq_out, dk_out = rope_backward(
            dq if dq is not None else empty, dk if dk is not None else empty, cos, sin, ctx.halves_equal
        )
        return (dq_out if dq is not None else None), (dk_out if dk is not None else None), None, None, None, None


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    halves_equal: bool = False,
    values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embedding to q and k (HF ``rotate_half`` convention), in place when possible.

    Runs the Triton kernels on CUDA or under ``TRITON_INTERPRET=1``, otherwise ``reference.rope``.
    Writes into q and k unless autograd forbids it (q or k a view, as attention's are; see
    :class:`RoPEFunction`) or the reference runs: always use the returned pair.

    Args:
        q: ``[B, Hq, S, D]`` queries (not a leaf that requires grad: it may be written in place).
        k: ``[B, Hk, S, D]`` keys.
        cos: ``[B, S, D]`` (or ``[1, S, D]`` shared by the batch), gathered by position ids.
        sin: same shape as ``cos``.
        halves_equal: set when the two halves of ``cos`` (and of ``sin``) along D are equal, as in every
            HF rotary embedding of the supported families (``cat(freqs, freqs)``): the kernels then read
            half the table. Not checked (that would cost a device sync): with unequal halves the result
            is wrong.
        values: False when nothing will read the rotated values, only back-propagate through them: the kernel path
            then returns uninitialised tensors in the rotated ones' layouts and runs no forward kernel; the
            backward is the same. For a checkpointed layer's recompute that replays a stashed attention
            (`kernels.lora.lean_qkv_active`: its q and k are uninitialised too): one read and write of q and k
            less per layer (~1.3 GB at 65,536 tokens of Llama-3.1-8B). The reference path ignores it.

    Returns:
        ``(q, k)`` rotated (or, with ``values=False``, tensors of their shape, layout and graph).

    Raises:
        ValueError: on mismatched shapes, an odd head dimension, or tensors on different devices.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be [B, H, S, D], got {list(q.shape)} and {list(k.shape)}")
    B, _, S, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, S, D):
        raise ValueError(f"rope: k {list(k.shape)} must share B, S, D with q {list(q.shape)}")
    if D % 2:
        raise ValueError(f"rope: head dimension must be even, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (S, D):
            raise ValueError(f"rope: {name} must be [{B} or 1, {S}, {D}], got {list(t.shape)}")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError("rope: q, k, cos and sin must be on one device")
    if not use_triton(q, k, cos, sin):
        return reference.rope(q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin, halves_equal, values)
