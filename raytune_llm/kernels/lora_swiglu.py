"""Triton kernels of the fused LoRA SwiGLU MLP: the rank-r epilogues of gate/up and of down fused with SwiGLU.

`lora_swiglu_forward` adds both rank-r updates of gate and up to their base GEMM outputs and applies
SwiGLU in one pass over the ``[N, I]`` tiles; `lora_swiglu_backward` finishes ``dH`` with down's rank-r
update and applies the activation's derivative, in place. The math, the saved tensors and the dtype
policy are in kernels/lora.py, which drives these kernels from `LoRAMLPFunction`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raytune_llm.kernels._dispatch import interpret_mode
from raytune_llm.kernels._rounding import rne_bf16

__all__ = ["lora_swiglu_backward", "lora_swiglu_forward"]

# Tiles (BM, BN, warps, rows from which the grid walks column blocks first) of the [N, I] activation kernels, with a
# [BM, r] x [r, BN] tensor-core dot for the rank-r epilogue; the last entry None: never. Neither the tile nor the grid
# order changes the bits (the rank-r dot is one K step). Swept on the H200 with rank 16 (bench/kernels/
# sweep_lora_swiglu.py). Session 10 at [8192, 14336] (bench/results/lora_swiglu_sweep_h200_20261129_s10*.json):
# narrow tiles fastest (forward 16x128x2 0.378 ms, 0.734 of copy bandwidth; backward 16x128x4 0.455 ms); rank updates
# as rank-1 FMAs on the CUDA cores instead of the dot were slower (1.36-2.46 ms), so they were dropped. Session 21
# (lora_swiglu_sweep_s21d_*): at 65,536 rows the grid walking column blocks first took the lean recompute's backward
# 4.540 -> 4.360 ms and the forward writing H alone 2.037 -> 1.979 (16x128x2 rows first: 2.193); at 16,384 and 8,192
# rows it lost on that backward (1.061 -> 1.093, 0.516 -> 0.550 ms), hence from 32,768 rows on. The forward that
# writes G and U back too stays 16x128x2 rows first (65,536: 3.195 ms, every setting within 0.09 ms but one).
_FWD = (16, 128, 2, None)
_FWD_H = (16, 128, 4, 32768)  # the forward of a checkpointed layer: H alone
_BWD = (16, 128, 4, 32768)
# The activation alone (G and U finished by their GEMMs): no dot, so the tile is a plain streaming one.
_FWD_ACT = (16, 128, 4, 32768)
# The interpreter pays per program and runs numpy on whole tiles, so it takes larger tiles there.
_TILE_INTERPRET = (64, 128)


@triton.jit
def _rank_update(
    acc,
    L_ptr,
    stride_l,
    R_ptr,
    stride_rk,
    stride_rn,
    rows,
    cols,
    n_rows,
    n_cols,
    rank,
    scale,
    R_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # acc [BM, BN] fp32 += scale * L[rows, :rank] @ R[:rank, cols]; R is read through its strides
    # (B^T when R is B [I, r]). Rank padded to R_PAD >= 16 (tl.dot's minimum) with zeros.
    k = tl.arange(0, R_PAD)
    lo = tl.load(
        L_ptr + rows[:, None] * stride_l + k[None, :], mask=(rows[:, None] < n_rows) & (k[None, :] < rank), other=0.0
    )
    ro = tl.load(
        R_ptr + k[:, None] * stride_rk + cols[None, :] * stride_rn,
        mask=(k[:, None] < rank) & (cols[None, :] < n_cols),
        other=0.0,
    )
    if UPCAST:  # the CPU interpreter gets bf16 tl.dot wrong
        lo = lo.to(tl.float32)
        ro = ro.to(tl.float32)
    return acc + scale * tl.dot(lo, ro, input_precision=DOT_PREC)


@triton.jit
def _finish_projection(
    acc,
    L_ptr,
    stride_l,
    R_ptr,
    stride_rk,
    stride_rn,
    rows,
    cols,
    n_rows,
    n_cols,
    rank,
    scale,
    OUT_ptr,
    R_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    # A base GEMM output tile (fp32) plus its rank update, rounded to OUT's dtype as it is stored: what the
    # forward kernel writes and what the backward kernel, finishing the projection itself, computes.
    x = _rank_update(
        acc, L_ptr, stride_l, R_ptr, stride_rk, stride_rn, rows, cols, n_rows, n_cols, rank, scale, R_PAD, UPCAST,
        DOT_PREC,
    )  # fmt: skip
    if RNE_BF16:
        x = rne_bf16(x)
    return x.to(OUT_ptr.dtype.element_ty)


@triton.jit
def _tile_index(BM: tl.constexpr, BN: tl.constexpr, COLS_FIRST: tl.constexpr):
    # This program's rows and columns of the [N, I] tensors. COLS_FIRST: the grid's first (fastest-launched) axis
    # walks the column blocks, so programs running together cover whole rows instead of one column block of many.
    if COLS_FIRST:
        pid_r, pid_c = tl.program_id(1), tl.program_id(0)
    else:
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    return pid_r.to(tl.int64) * BM + tl.arange(0, BM), pid_c * BN + tl.arange(0, BN)


@triton.jit
def _lora_swiglu_fwd_kernel(
    G_ptr,
    U_ptr,
    H_ptr,
    XAG_ptr,
    XAU_ptr,
    BG_ptr,
    BU_ptr,
    stride_xag,
    stride_xau,
    stride_bg0,
    stride_bg1,
    stride_bu0,
    stride_bu1,
    n_rows,
    n_cols,
    rank_g,
    rank_u,
    scale_g,
    scale_u,
    R_PAD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    RNE_BF16: tl.constexpr,
    STORE_GU: tl.constexpr,
    COLS_FIRST: tl.constexpr,
    RANK: tl.constexpr,
):
    # G, U hold the base GEMM outputs on entry ([N, I], contiguous) and the full projections on exit (STORE_GU;
    # otherwise they are left as they were); H = silu(G) * U. One pass instead of two addmm epilogues plus an
    # activation kernel. RANK False: G and U are finished already (their GEMMs ran on the adapters' K-extended
    # operands); the kernel is the activation alone.
    rows, cols = _tile_index(BM, BN, COLS_FIRST)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None] * n_cols + cols[None, :]
    g = tl.load(G_ptr + offs, mask=mask, other=0.0)
    u = tl.load(U_ptr + offs, mask=mask, other=0.0)
    if RANK:
        # The activation sees G and U as stored (rounded), exactly what backward recomputes from.
        g = _finish_projection(
            g.to(tl.float32), XAG_ptr, stride_xag, BG_ptr, stride_bg1, stride_bg0, rows, cols, n_rows, n_cols,
            rank_g, scale_g, G_ptr, R_PAD, UPCAST, DOT_PREC, RNE_BF16,
        )  # fmt: skip
        u = _finish_projection(
            u.to(tl.float32), XAU_ptr, stride_xau, BU_ptr, stride_bu1, stride_bu0, rows, cols, n_rows, n_cols,
            rank_u, scale_u, U_ptr, R_PAD, UPCAST, DOT_PREC, RNE_BF16,
        )  # fmt: skip
    if STORE_GU:
        tl.store(G_ptr + offs, g, mask=mask)
        tl.store(U_ptr + offs, u, mask=mask)
    gf = g.to(tl.float32)
    h = gf * tl.sigmoid(gf) * u.to(tl.float32)
    if RNE_BF16:
        h = rne_bf16(h)
    tl.store(H_ptr + offs, h.to(H_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_swiglu_bwd_kernel(
    DH_ptr,
    G_ptr,
    U_ptr,
    LOW_ptr,
    AD_ptr,
    XAG_ptr,
    XAU_ptr,
    BG_ptr,
    BU_ptr,
    stride_low,
    stride_ad,
    stride_xag,
    stride_xau,
    stride_bg0,
    stride_bg1,
    stride_bu0,
    stride_bu1,
    n_rows,
    n_cols,
    rank_d,
    rank_g,
    rank_u,
    scale_g,
    scale_u,
    R_PAD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    FINISH_G: tl.constexpr,
    FINISH_U: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    RNE_BF16: tl.constexpr,
    COLS_FIRST: tl.constexpr,
):
    # dH = dH_base + LOW @ A_d (LOW = s_d dY B_d, [N, r_d]); then the activation's backward, in place:
    # H over dH, dG over G, dU over U (each element read before it is written, within one program).
    # FINISH_G / FINISH_U: G / U hold the base GEMM output (a lean recompute ran no forward kernel; U alone where the
    # finished gate was kept); the rank update is added here as the forward kernel adds it, rounded to the stored
    # dtype the same way.
    rows, cols = _tile_index(BM, BN, COLS_FIRST)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None] * n_cols + cols[None, :]
    dh = tl.load(DH_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = _rank_update(
        dh, LOW_ptr, stride_low, AD_ptr, stride_ad, 1, rows, cols, n_rows, n_cols, rank_d, 1.0, R_PAD, UPCAST, DOT_PREC
    )
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FINISH_G:  # the forward kernel's own finishing step, so the same stored values
        g = _finish_projection(
            g, XAG_ptr, stride_xag, BG_ptr, stride_bg1, stride_bg0, rows, cols, n_rows, n_cols, rank_g, scale_g,
            G_ptr, R_PAD, UPCAST, DOT_PREC, RNE_BF16,
        ).to(tl.float32)  # fmt: skip
    if FINISH_U:
        u = _finish_projection(
            u, XAU_ptr, stride_xau, BU_ptr, stride_bu1, stride_bu0, rows, cols, n_rows, n_cols, rank_u, scale_u,
            U_ptr, R_PAD, UPCAST, DOT_PREC, RNE_BF16,
        ).to(tl.float32)  # fmt: skip
    sg = tl.sigmoid(g)
    silu = g * sg
    h = silu * u
    dg = dh * u * sg * (1.0 + g * (1.0 - sg))
    du = dh * silu
    if RNE_BF16:
        h = rne_bf16(h)
        dg = rne_bf16(dg)
        du = rne_bf16(du)
    tl.store(DH_ptr + offs, h.to(DH_ptr.dtype.element_ty), mask=mask)
    tl.store(G_ptr + offs, dg.to(G_ptr.dtype.element_ty), mask=mask)
    tl.store(U_ptr + offs, du.to(U_ptr.dtype.element_ty), mask=mask)


# ---- launchers ----------------------------------------------------------------------------------


def _tile_cfg(t: torch.Tensor, ranks: list[int], setting: tuple[int, int, int]) -> dict:
    interp = interpret_mode()
    bm, bn, warps, from_rows = (*_TILE_INTERPRET, 4, setting[3]) if interp else setting
    # a grid's second axis holds < 65,536 blocks
    cols_first = from_rows is not None and from_rows <= t.shape[0] and triton.cdiv(t.shape[0], bm) < 2**16
    r_pad = max(16, triton.next_power_of_2(max(ranks)))
    return {
        "R_PAD": r_pad,
        "BM": bm,
        "BN": bn,
        "num_warps": warps,
        "COLS_FIRST": cols_first,
        "UPCAST": interp,
        # fp32 operands: exact products ("tf32" would round them to 10 mantissa bits); bf16 operands
        # take the tensor-core path whatever this says.
        "DOT_PREC": "ieee" if (interp or t.dtype == torch.float32) else "tf32",
        "RNE_BF16": interp and t.dtype == torch.bfloat16,
    }


def _grid(n_rows: int, n_cols: int, cfg: dict) -> tuple[int, int]:
    grid = (triton.cdiv(n_rows, cfg["BM"]), triton.cdiv(n_cols, cfg["BN"]))
    return grid[::-1] if cfg["COLS_FIRST"] else grid


def lora_swiglu_forward(
    G, U, xa_g, xa_u, Bg, Bu, scale_g: float, scale_u: float, store_gu: bool = True, finished: bool = False
) -> torch.Tensor:
    """Finish the gate and up projections and apply SwiGLU, in one pass.

    ``G += scale_g * xa_g @ Bg^T``, ``U += scale_u * xa_u @ Bu^T`` (in place), ``H = silu(G) * U``. With
    ``store_gu`` False the finished projections are not written back (``G`` and ``U`` keep the base outputs): for a
    forward that needs H alone, two [N, I] writes fewer. H has the same bits either way. With ``finished`` ``G``
    and ``U`` are the finished projections already: ``H = silu(G) * U`` alone (the adapters' arguments unread, G and
    U unwritten).

    Args:
        G: gate base GEMM output ``[N, I]``, contiguous; becomes the gate projection (with ``store_gu``).
        U: up base GEMM output ``[N, I]``, contiguous; becomes the up projection (with ``store_gu``).
        xa_g: ``X A_g^T`` ``[N, r_g]`` (unit column stride).
        xa_u: ``X A_u^T`` ``[N, r_u]`` (unit column stride).
        Bg: ``[I, r_g]`` in ``G``'s dtype.
        Bu: ``[I, r_u]`` in ``U``'s dtype.
        scale_g: gate LoRA scaling.
        scale_u: up LoRA scaling.

    Returns:
        ``H`` ``[N, I]`` in ``G``'s dtype.
    """
    n_rows, n_cols = G.shape
    H = torch.empty_like(G)
    if G.numel():
        store_gu = store_gu and not finished
        cfg = _tile_cfg(G, [xa_g.shape[1], xa_u.shape[1]], _FWD_ACT if finished else _FWD if store_gu else _FWD_H)
        _lora_swiglu_fwd_kernel[_grid(n_rows, n_cols, cfg)](
            G, U, H, xa_g, xa_u, Bg, Bu,
            xa_g.stride(0), xa_u.stride(0), Bg.stride(0), Bg.stride(1), Bu.stride(0), Bu.stride(1),
            n_rows, n_cols, xa_g.shape[1], xa_u.shape[1], scale_g, scale_u, STORE_GU=store_gu, RANK=not finished,
            **cfg,
        )  # fmt: skip
    return H


def lora_swiglu_backward(dH, G, U, low_d, Ad, finish: tuple | None = None, finish_gate: bool = True) -> None:
    """Finish ``dH`` with the down adapter's rank update, then differentiate SwiGLU, all in place.

    ``dH += low_d @ Ad``; then ``dH <- H = silu(G) * U``, ``G <- dG``, ``U <- dU``.

    Args:
        dH: ``dY W_d`` ``[N, I]``, contiguous.
        G: gate projection ``[N, I]``, contiguous (with ``finish``: the gate base GEMM output).
        U: up projection ``[N, I]``, contiguous (with ``finish``: the up base GEMM output).
        low_d: ``s_d dY B_d`` ``[N, r_d]`` (unit column stride).
        Ad: ``[r_d, I]``, contiguous, in ``dH``'s dtype.
        finish: ``(xa_g, xa_u, Bg, Bu, scale_g, scale_u)`` as `lora_swiglu_forward` takes them: first finish
            ``G`` and ``U`` with their rank updates, rounded as that kernel stores them, so the results are
            the bits of `lora_swiglu_forward` followed by this backward. None: ``G`` and ``U`` are finished.
        finish_gate: with ``finish``, False finishes ``U`` alone (``G`` is the finished gate, kept from the forward).
    """
    n_rows, n_cols = G.shape
    if not G.numel():
        return
    if finish is None:
        xa_g = xa_u = low_d
        Bg = Bu = Ad.t()
        scale_g = scale_u = 0.0
        ranks = [low_d.shape[1]]
    else:
        xa_g, xa_u, Bg, Bu, scale_g, scale_u = finish
        ranks = [low_d.shape[1], xa_g.shape[1], xa_u.shape[1]]
    cfg = _tile_cfg(G, ranks, _BWD)
    _lora_swiglu_bwd_kernel[_grid(n_rows, n_cols, cfg)](
        dH, G, U, low_d, Ad, xa_g, xa_u, Bg, Bu,
        low_d.stride(0), Ad.stride(0), xa_g.stride(0), xa_u.stride(0),
        Bg.stride(0), Bg.stride(1), Bu.stride(0), Bu.stride(1),
        n_rows, n_cols, low_d.shape[1], xa_g.shape[1], xa_u.shape[1], scale_g, scale_u,
        FINISH_G=finish is not None and finish_gate, FINISH_U=finish is not None, **cfg,
    )  # fmt: skip
