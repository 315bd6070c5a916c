"""Both rank-r products of one large operand from a single read of it: ``P = M R`` and ``Q = M^T L``.

Every LoRA adapter's backward forms two products of its upstream gradient ``M = dY`` ``[N, K]``: ``dY B``
(``[N, r]``, for ``dX`` and ``dA``) and ``dY^T (X A^T)`` (``[K, r]``, ``dB``); the MLP's ``H`` likewise gives
``H A_d^T`` and ``H^T (dY B_d)``. As two cuBLAS GEMMs each reads ``M`` whole: per 4x2048 Llama-3.1-8B layer
~0.9 GB of second reads (``dG``, ``dU`` and ``H`` are 224 MiB each), ~0.3 ms at the H200's bandwidth.

Here each program owns a block of ``M``: ``ROWS`` rows by ``BK`` columns. It keeps ``R``'s ``BK`` rows and a
``[BK, r]`` fp32 accumulator for ``Q``, and walks its rows ``BN`` at a time: each ``[BN, BK]`` tile is loaded
once and feeds both tensor-core dots, ``tile @ R_block`` (this column block's share of ``P`` for those rows)
and ``tile^T @ L_rows`` (added to ``Q``'s accumulator). The shares are fp32 partial sums in two small buffers
(``[K / BK, N, r]`` and ``[N / ROWS, K, r]``), summed afterwards in a fixed order: deterministic, no atomics.
At ``N = 8192``, ``K = 14336``, ``r = 16`` they are 28 and 7 MiB against the 224 MiB read saved.

Below the kernel, the helpers kernels/lora.py forms every adapter gradient with: `_products` (paired through the
kernel in bf16/fp16), `_grad` (a GEMM writing fp32 on CUDA), `_joint_grad` and `_scaled`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raytune_llm.kernels._dispatch import fp32_out_gemms, interpret_mode

__all__ = ["lora_pair"]

# (BN, BK, warps): the tile walked and the column block each program owns. Swept on the H200 at N = 8192, r = 16
# (bench/kernels/bench_lora_epilogues.py, bench/results/lora_pair_s15d_h200_20261130.json), against cuBLAS's two
# products: K = 14336 0.132 -> 0.104 ms, K = 4096 0.053 -> 0.044, K = 1024 0.025 -> 0.025; (64, 256, 8), which the
# session's e2e ran, 0.108 and 0.051; (128, 256, 8) 0.103 and 0.051. BK = 256 keeps P's partials at 8 B per element
# of M's rows.
_TILE = (32, 256, 4, 3)  # and num_stages (3: Triton's default on CUDA, which the sweeps above ran)
# Under the interpreter, which pays per program: 64 rows x 128 columns (the LoRA SwiGLU kernels' interpreter tile),
# 8 times fewer programs than 32 x 32.
_TILE_INTERPRET = (64, 128, 4, 1)


@triton.jit
def _lora_pair_kernel(
    M_ptr,
    R_ptr,
    L_ptr,
    PP_ptr,
    QP_ptr,
    n_rows,
    n_cols,
    rank_r,
    rank_l,
    stride_m0,
    stride_m1,
    stride_r0,
    stride_r1,
    stride_l0,
    stride_l1,
    ROWS: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    R_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WANT_P: tl.constexpr,
    WANT_Q: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c.to(tl.int64) * BK + tl.arange(0, BK)  # int64: a transposed M's column stride is N
    k = tl.arange(0, R_PAD)
    col_ok = cols < n_cols
    if WANT_P:
        r_blk = tl.load(
            R_ptr + cols[:, None] * stride_r0 + k[None, :] * stride_r1,
            mask=col_ok[:, None] & (k[None, :] < rank_r),
            other=0.0,
        )
        if UPCAST:  # the CPU interpreter gets bf16 tl.dot wrong
            r_blk = r_blk.to(tl.float32)
    q_acc = tl.zeros((BK, R_PAD), dtype=tl.float32)
    row0 = pid_r.to(tl.int64) * ROWS
    for i in range(0, ROWS, BN):
        rows = row0 + i + tl.arange(0, BN)
        row_ok = rows < n_rows
        m = tl.load(
            M_ptr + rows[:, None] * stride_m0 + cols[None, :] * stride_m1,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            m = m.to(tl.float32)
        if WANT_P:
            p = tl.dot(m, r_blk, input_precision=DOT_PREC)  # [BN, R_PAD]: this column block's share of P's rows
            tl.store(PP_ptr + (pid_c * n_rows + rows[:, None]) * R_PAD + k[None, :], p, mask=row_ok[:, None])
        if WANT_Q:
            lr = tl.load(
                L_ptr + rows[:, None] * stride_l0 + k[None, :] * stride_l1,
                mask=row_ok[:, None] & (k[None, :] < rank_l),
                other=0.0,
            )
            if UPCAST:
                lr = lr.to(tl.float32)
            q_acc += tl.dot(tl.trans(m), lr, input_precision=DOT_PREC)  # [BK, R_PAD]
    if WANT_Q:
        tl.store(QP_ptr + (pid_r * n_cols + cols[:, None]) * R_PAD + k[None, :], q_acc, mask=col_ok[:, None])


def _rows_per_program(n_rows: int, n_col_blocks: int, bn: int) -> int:
    """Rows each program walks: enough for Q's partials to stay small (at most 8 row blocks), halved until the grid
    has two programs per SM where the rows allow (132 SMs on the H200)."""
    rows = max(bn, triton.next_power_of_2(triton.cdiv(n_rows, 8)))
    while rows > bn and triton.cdiv(n_rows, rows) * n_col_blocks < 2 * 132:
        rows //= 2
    return rows


def lora_pair(
    M: torch.Tensor,
    R: torch.Tensor | None,
    L: torch.Tensor | None,
    p_dtype: torch.dtype,
    q_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(M @ R, M^T @ L)`` reading ``M`` once; a None operand skips its product (the other has the same bits as
    in a paired call: the tiles and the order of the sums do not depend on it).

    Args:
        M: ``[N, K]`` (any strides), bf16/fp16/fp32.
        R: ``[K, r]`` in ``M``'s dtype, or None.
        L: ``[N, r2]`` in ``M``'s dtype, or None.
        p_dtype: dtype of ``P = M @ R`` ``[N, r]``.
        q_dtype: dtype of ``Q = M^T @ L`` ``[K, r2]``.

    Returns:
        ``(P, Q)``: sums of fp32 partial products in a fixed order, each rounded once to its dtype; None where its
        operand was.

    Raises:
        ValueError: operands whose shapes do not chain, or neither given.
    """
    n, kk = M.shape
    if R is None and L is None:
        raise ValueError("lora_pair: neither R nor L given")
    if (R is not None and R.shape[0] != kk) or (L is not None and L.shape[0] != n):
        shapes = [None if t is None else tuple(t.shape) for t in (M, R, L)]
        raise ValueError(f"lora_pair: M, R, L {shapes} do not chain")
    r = R.shape[1] if R is not None else 0
    r2 = L.shape[1] if L is not None else 0
    r_pad = max(16, triton.next_power_of_2(max(r, r2)))
    interp = interpret_mode()
    bn, bk, warps, stages = _TILE_INTERPRET if interp else _TILE
    n_cb = triton.cdiv(kk, bk)
    rows = _rows_per_program(n, n_cb, bn)
    n_rb = triton.cdiv(n, rows)
    if not (n and kk):
        P = torch.zeros(n, r, dtype=p_dtype, device=M.device) if R is not None else None
        return P, (torch.zeros(kk, r2, dtype=q_dtype, device=M.device) if L is not None else None)
    pp = torch.empty(n_cb, n, r_pad, dtype=torch.float32, device=M.device) if R is not None else None
    qp = torch.empty(n_rb, kk, r_pad, dtype=torch.float32, device=M.device) if L is not None else None
    _lora_pair_kernel[(n_rb, n_cb)](
        M, R if R is not None else M, L if L is not None else M, pp if pp is not None else M,
        qp if qp is not None else M, n, kk, r, r2,
        M.stride(0), M.stride(1),
        *(R.stride() if R is not None else (0, 0)), *(L.stride() if L is not None else (0, 0)),
        ROWS=rows, BN=bn, BK=bk, R_PAD=r_pad, UPCAST=interp,
        DOT_PREC="ieee" if (interp or M.dtype == torch.float32) else "tf32", num_warps=warps, num_stages=stages,
        WANT_P=R is not None, WANT_Q=L is not None,
    )  # fmt: skip
    P = pp.sum(0)[:, :r].to(p_dtype).contiguous() if pp is not None else None
    Q = qp.sum(0)[:, :r2].to(q_dtype).contiguous() if qp is not None else None
    return P, Q


# ---- the LoRA ops' gradient products (kernels/lora.py) -------------------------------------------------------


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t * s`` in place, or ``t`` itself when ``s`` is 1 (alpha = r, as in the benchmarks): x * 1.0 is x, and the
    multiply was one kernel per adapter product in backward, 448 a step at 32 layers (0.57 ms on the H200, session 14's
    profile)."""
    return t if s == 1.0 else t.mul_(s)


def _grad(a: torch.Tensor, b: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """An adapter's gradient ``s * a @ b`` in its ``dtype``: for fp32 on CUDA one GEMM writing fp32 (``out_dtype``: not
    rounded to the compute dtype first, no cast kernel), else the product in the compute dtype, scaled, cast."""
    if dtype == torch.float32 and fp32_out_gemms(a):
        return _scaled(torch.mm(a, b, out_dtype=torch.float32), s)
    return _scaled(a @ b, s).to(dtype)


# bf16/fp16: an adapter's two products of one operand from one read (`kernels.lora_pair`); False (and fp32): two GEMMs.
_PAIRED = [True]


def _products(
    M: torch.Tensor, R: torch.Tensor | None, L: torch.Tensor | None, s: float, q_dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(s M R, s M^T L)`` (None where its operand is): an adapter's ``s dY B`` and ``dB = s dY^T (X A^T)`` (in
    ``q_dtype``). One product alone has its paired bits, so a path that cannot pair matches one that does."""
    if R is None and L is None:
        return None, None
    if _PAIRED[0] and M.dtype in (torch.bfloat16, torch.float16):
        P, Q = lora_pair(M, R, L, M.dtype, q_dtype)
    else:
        P = M @ R if R is not None else None
        Q = _grad(M.t(), L, 1.0, q_dtype) if L is not None else None
    return (None if P is None else _scaled(P, s)), (None if Q is None else _scaled(Q, s))


def _joint_grad(a: torch.Tensor, b: torch.Tensor, dtypes: list[torch.dtype]) -> torch.Tensor:
    """A fused call's stacked A gradients ``a @ b``: in the adapters' dtype when they share one, else the compute's."""
    return _grad(a, b, 1.0, dtypes[0]) if len(set(dtypes)) == 1 else a @ b
