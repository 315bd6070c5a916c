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

# Launch settings (BM, BN, warps, num_stages, spans) of the [N, I] activation kernels. Each program owns one BN-wide
# column block and one of `spans` row spans: it loads its adapters' [r, BN] tiles once and walks the span BM rows at a
# time (a software-pipelined loop, num_stages), adding the rank-r update with a [BM, r] x [r, BN] tensor-core dot per
# step. On the GPU neither the tile nor the span changes the bits (the rank-r dot is one K step; every setting swept
# gave the bits of one 16-row step a program, as the one-tile kernels these replaced ran; under the interpreter, whose
# dot is numpy's, the tile may). The span is a power of two, so a row count just over a power of two times `spans`
# gets about half the spans, twice as long, and its last one mostly past the end: those steps are masked, not skipped
# (under 2 / spans of the rows more walked, 6% at 32; no more bytes moved). Session 23 on the H200,
# rank 16 (bench/results/lora_swiglu_sweep_s23c_*.json): 16:128:4:3:32 fastest of ten settings for all four kernels
# at 65,536, 16,384 and 8,192 rows, 0.89-0.94 of copy bandwidth. At 65,536 x 14,336, ms, against the one-tile kernels
# (swiglu_persist_s23b_*: 0.61-0.75 of copy): forward G,U,H 2.417 (3.060), H alone 1.414 (1.855), backward 2.865
# (3.533), backward finishing G and U 2.855 (4.350).
_LAUNCH = (16, 128, 4, 3, 32)  # every variant: the forward writing G, U and H or H alone, the backward either way
# The interpreter pays per program and per step and runs numpy on whole tiles: larger tiles, one step a program
# (_SPANS_INTERPRET None; a number: that many row spans, walked a tile at a time, as on the GPU).
_TILE_INTERPRET = (64, 128)
_SPANS_INTERPRET: int | None = None


@triton.jit
def _r_tile(R_ptr, stride_rk, stride_rn, cols, n_cols, rank, R_PAD: tl.constexpr, UPCAST: tl.constexpr):
    # R[:rank, cols] as an [R_PAD, BN] tile, read through its strides (B^T when R is B [I, r]); the rank padded to
    # R_PAD >= 16 (tl.dot's minimum) with zeros.
    k = tl.arange(0, R_PAD)
    ro = tl.load(
        R_ptr + k[:, None] * stride_rk + cols[None, :] * stride_rn,
        mask=(k[:, None] < rank) & (cols[None, :] < n_cols),
        other=0.0,
    )
    if UPCAST:  # the CPU interpreter gets bf16 tl.dot wrong
        ro = ro.to(tl.float32)
    return ro


@triton.jit
def _rank_update(
    acc, L_ptr, stride_l, ro, rows, n_rows, rank, scale,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # acc [BM, BN] fp32 += scale * L[rows, :rank] @ ro (an `_r_tile`).
    k = tl.arange(0, R_PAD)
    lo = tl.load(
        L_ptr + rows[:, None] * stride_l + k[None, :], mask=(rows[:, None] < n_rows) & (k[None, :] < rank), other=0.0
    )
    if UPCAST:
        lo = lo.to(tl.float32)
    return acc + scale * tl.dot(lo, ro, input_precision=DOT_PREC)


@triton.jit
def _finish_projection(
    acc, L_ptr, stride_l, ro, rows, n_rows, rank, scale, OUT_ptr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, RNE_BF16: tl.constexpr,
):  # fmt: skip
    # A base GEMM output tile (fp32) plus its rank update, rounded to OUT's dtype as it is stored: what the
    # forward kernel writes and what the backward kernel, finishing the projection itself, computes.
    x = _rank_update(acc, L_ptr, stride_l, ro, rows, n_rows, rank, scale, R_PAD, UPCAST, DOT_PREC)
    if RNE_BF16:
        x = rne_bf16(x)
    return x.to(OUT_ptr.dtype.element_ty)


@triton.jit
def _step(row0, cols, n_rows, n_cols, BM: tl.constexpr):
    # One step of a span: its BM rows from row0, the mask of the [BM, BN] tile and its offsets in an [N, I] tensor.
    rows = row0 + tl.arange(0, BM)
    return rows, (rows[:, None] < n_rows) & (cols[None, :] < n_cols), rows[:, None] * n_cols + cols[None, :]


@triton.jit
def _lora_swiglu_fwd_kernel(
    G_ptr, U_ptr, H_ptr, XAG_ptr, XAU_ptr, BG_ptr, BU_ptr,
    stride_xag, stride_xau, stride_bg0, stride_bg1, stride_bu0, stride_bu1,
    n_rows, n_cols, rank_g, rank_u, scale_g, scale_u,
    R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPAN: tl.constexpr, STAGES: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, RNE_BF16: tl.constexpr, STORE_GU: tl.constexpr,
):  # fmt: skip
    # G, U hold the base GEMM outputs on entry ([N, I], contiguous) and the full projections on exit (STORE_GU;
    # otherwise they are left as they were); H = silu(G) * U. One pass instead of two addmm epilogues plus an
    # activation kernel. This program: columns [c * BN, (c + 1) * BN), rows [s * span, (s + 1) * span).
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    bg = _r_tile(BG_ptr, stride_bg1, stride_bg0, cols, n_cols, rank_g, R_PAD, UPCAST)
    bu = _r_tile(BU_ptr, stride_bu1, stride_bu0, cols, n_cols, rank_u, R_PAD, UPCAST)
    r_begin = tl.program_id(1).to(tl.int64) * SPAN
    for r0 in tl.range(0, SPAN, BM, num_stages=STAGES):
        rows, mask, offs = _step(r_begin + r0, cols, n_rows, n_cols, BM)
        g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # The activation sees G and U as stored (rounded), exactly what backward recomputes from.
        g = _finish_projection(g, XAG_ptr, stride_xag, bg, rows, n_rows, rank_g, scale_g, G_ptr, R_PAD, UPCAST,
                               DOT_PREC, RNE_BF16)  # fmt: skip
        u = _finish_projection(u, XAU_ptr, stride_xau, bu, rows, n_rows, rank_u, scale_u, U_ptr, R_PAD, UPCAST,
                               DOT_PREC, RNE_BF16)  # fmt: skip
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
    DH_ptr, G_ptr, U_ptr, LOW_ptr, AD_ptr, XAG_ptr, XAU_ptr, BG_ptr, BU_ptr,
    stride_low, stride_ad, stride_xag, stride_xau, stride_bg0, stride_bg1, stride_bu0, stride_bu1,
    n_rows, n_cols, rank_d, rank_g, rank_u, scale_g, scale_u,
    R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPAN: tl.constexpr, STAGES: tl.constexpr, FINISH_G: tl.constexpr,
    FINISH_U: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, RNE_BF16: tl.constexpr,
):  # fmt: skip
    # dH = dH_base + LOW @ A_d (LOW = s_d dY B_d, [N, r_d]); then the activation's backward, in place:
    # H over dH, dG over G, dU over U (each element read before it is written, within one program).
    # FINISH_G / FINISH_U: G / U hold the base GEMM output (a lean recompute ran no forward kernel; U alone where the
    # finished gate was kept); the rank update is added here as the forward kernel adds it, rounded to the stored
    # dtype the same way. Programs as in the forward kernel.
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    ad = _r_tile(AD_ptr, stride_ad, 1, cols, n_cols, rank_d, R_PAD, UPCAST)
    if FINISH_G:
        bg = _r_tile(BG_ptr, stride_bg1, stride_bg0, cols, n_cols, rank_g, R_PAD, UPCAST)
    if FINISH_U:
        bu = _r_tile(BU_ptr, stride_bu1, stride_bu0, cols, n_cols, rank_u, R_PAD, UPCAST)
    r_begin = tl.program_id(1).to(tl.int64) * SPAN
    for r0 in tl.range(0, SPAN, BM, num_stages=STAGES):
        rows, mask, offs = _step(r_begin + r0, cols, n_rows, n_cols, BM)
        dh = tl.load(DH_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dh = _rank_update(dh, LOW_ptr, stride_low, ad, rows, n_rows, rank_d, 1.0, R_PAD, UPCAST, DOT_PREC)
        g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if FINISH_G:  # the forward kernel's own finishing step, so the same stored values
            g = _finish_projection(g, XAG_ptr, stride_xag, bg, rows, n_rows, rank_g, scale_g, G_ptr, R_PAD, UPCAST,
                                   DOT_PREC, RNE_BF16).to(tl.float32)  # fmt: skip
        if FINISH_U:
            u = _finish_projection(u, XAU_ptr, stride_xau, bu, rows, n_rows, rank_u, scale_u, U_ptr, R_PAD, UPCAST,
                                   DOT_PREC, RNE_BF16).to(tl.float32)  # fmt: skip
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


def _tile_cfg(t: torch.Tensor, ranks: list[int]) -> tuple[dict, tuple[int, int]]:
    """The kernel's compile-time arguments (``SPAN``: rows a program walks) and its grid, for ``t`` [N, I]."""
    interp = interpret_mode()
    n_rows, n_cols = t.shape
    if interp:
        bm, bn = _TILE_INTERPRET
        warps, stages, spans = 4, 1, _SPANS_INTERPRET or triton.cdiv(n_rows, bm)
    else:
        bm, bn, warps, stages, spans = _LAUNCH
    # a power of two (a compile-time constant: one kernel for each, not for each row count), at least one tile
    span = max(bm, triton.next_power_of_2(triton.cdiv(n_rows, spans)))
    cfg = {
        "R_PAD": max(16, triton.next_power_of_2(max(ranks))),
        "BM": bm,
        "BN": bn,
        "STAGES": stages,
        "num_warps": warps,
        "UPCAST": interp,
        # fp32 operands: exact products ("tf32" would round them to 10 mantissa bits); bf16 operands
        # take the tensor-core path whatever this says.
        "DOT_PREC": "ieee" if (interp or t.dtype == torch.float32) else "tf32",
        "RNE_BF16": interp and t.dtype == torch.bfloat16,
        "SPAN": span,
    }
    return cfg, (triton.cdiv(n_cols, bn), triton.cdiv(n_rows, span))


def lora_swiglu_forward(
    G, U, xa_g, xa_u, Bg, Bu, scale_g: float, scale_u: float, store_gu: bool = True
) -> torch.Tensor:
    """Finish the gate and up projections and apply SwiGLU, in one pass.

    ``G += scale_g * xa_g @ Bg^T``, ``U += scale_u * xa_u @ Bu^T`` (in place), ``H = silu(G) * U``. With
    ``store_gu`` False the finished projections are not written back (``G`` and ``U`` keep the base outputs): for a
    forward that needs H alone, two [N, I] writes fewer. H has the same bits either way.

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
        cfg, grid = _tile_cfg(G, [xa_g.shape[1], xa_u.shape[1]])
        _lora_swiglu_fwd_kernel[grid](
            G, U, H, xa_g, xa_u, Bg, Bu,
            xa_g.stride(0), xa_u.stride(0), Bg.stride(0), Bg.stride(1), Bu.stride(0), Bu.stride(1),
            n_rows, n_cols, xa_g.shape[1], xa_u.shape[1], scale_g, scale_u, STORE_GU=store_gu, **cfg,
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
    cfg, grid = _tile_cfg(G, ranks)
    _lora_swiglu_bwd_kernel[grid](
        dH, G, U, low_d, Ad, xa_g, xa_u, Bg, Bu,
        low_d.stride(0), Ad.stride(0), xa_g.stride(0), xa_u.stride(0),
        Bg.stride(0), Bg.stride(1), Bu.stride(0), Bu.stride(1),
        n_rows, n_cols, low_d.shape[1], xa_g.shape[1], xa_u.shape[1], scale_g, scale_u,
        FINISH_G=finish is not None and finish_gate, FINISH_U=finish is not None, **cfg,
    )  # fmt: skip
