"""The LoRA SwiGLU MLP's activation kernels with the adapters' rank-r products of ``H``, ``dG`` and ``dU`` in the same
pass over the ``[N, I]`` tensors.

Unfused, the MLP's backward runs `kernels.lora_swiglu.lora_swiglu_backward` (reads ``dH``, ``G``, ``U``; writes
``H``, ``dG``, ``dU``) and then three `kernels.lora_pair` calls read those three again: ``H``'s pair
(``H A_d^T`` where a lean recompute has none from the forward, and ``H^T (s_d dY B_d)`` for ``dA_d``), ``dG``'s
(``dG B_g``, ``dG^T (X A_g^T)``) and ``dU``'s. At 65,536 tokens of Llama-3.1-8B that is 5.6 GB read and 1.9 GB
written (``H``) a layer that the gradients do not need; the forward likewise reads ``H`` again for ``H A_d^T``.

`lora_swiglu_grad` does the backward in one kernel. Each program owns ``BK`` columns of ``I`` and a span of rows, as
a `lora_pair` program does, and walks the span ``BN`` rows at a time: it finishes the tile's ``dH`` (and ``G``,
``U`` in a lean recompute) with the rank updates and differentiates SwiGLU exactly as the backward kernel does,
stores ``dG`` and ``dU`` (the base ``dX`` GEMMs read them), and feeds the rounded ``H``, ``dG`` and ``dU`` tiles to
`lora_pair`'s two dots each. ``H`` is never written. `lora_swiglu_forward_ha` is the forward kernel walked the same
way, with ``H A_d^T``'s share from each ``H`` tile it writes.

Bits. The fused kernels take the unfused ones' values and roundings step for step (the same rank updates, SwiGLU
tile math, ``BK``-column blocks and, unless the launch tile splits them, row spans, fp32 partials summed in the same
order), but their dots may sum in another order: the tiles are held transposed (see the kernel), and on sm_90 the rank updates then run as warpgroup
MMAs where the unfused kernels' run as ``mma.sync``. So fused and unfused agree up to the order of fp32 sums: a
value may differ in its last bit. What training needs holds bit for bit: every path of a layer runs the same
kernels, so a lean recompute's backward (its ``H A_d^T`` formed from the ``H`` it computes) gives what a kept
layer's gives (the forward's ``H A_d^T``). Tests check fused == unfused exactly with the interpreter's dot made
order-free, and the lean == kept property with its own dot (and on the GPU). Partial buffers: ``[I / BK, N, r]``
fp32 per ``[N, r]`` product (235 MB at 65,536 x 14,336, rank 16; `lora_pair` allocates one at a time, this kernel
two or three at once) and ``[N / ROWS, I, r]`` per ``[I, r]`` one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from raytune_llm.kernels import lora_pair as pair_mod
from raytune_llm.kernels._dispatch import interpret_mode
from raytune_llm.kernels._rounding import rne_bf16
from raytune_llm.kernels.lora_pair import _products, _rows_per_program, _scaled, _sum_partials
from raytune_llm.kernels.lora_swiglu import (
    lora_swiglu_backward,
    lora_swiglu_forward,
    swiglu_grad_tile,
    swiglu_store_tile,
)

__all__ = ["lora_swiglu_forward_ha", "lora_swiglu_grad", "swiglu_backward_products", "swiglu_forward_products"]

# (BN, warps[, num_stages[, s]]): BK is lora_pair's (the [N, r] products' bits depend on it); s splits lora_pair's
# row span 2^s ways (more programs; Q's partials grow with them, and their sum order differs from lora_pair's).
# Compiled for sm_90 (triton.compile, `cuobjdump -res-usage`, session 21): a lean recompute's kernel spilled 48 B a
# thread at 16 x 8, 424 B at 32 x 8, 712 B at 16 x 4. Timed on the H200 (session 22,
# bench/results/lora_swiglu_grad_*s22*): at 65,536 x 14,336, rank 16, the lean backward took 11.45 ms here against
# 6.01 unfused (the kernel and three lora_pair reads), 7.06 at best (16:4, one stage, span split 8 ways); the H-only
# forward 3.49 against 2.44 (2.49 at best). Each program walks its span 16-32 rows at a time through nine small dots
# a step, where the unfused kernels stream wide tiles: the bytes saved do not pay for it.
_TILE = (16, 8)
_TILE_INTERPRET = (pair_mod._TILE_INTERPRET[0], 4)
# Opt-in (RAYTUNE_LLM_FUSED_MLP_PRODUCTS=1; the planner then counts its partial buffers): the GPU tests give the
# unfused kernels' bits exactly (session 22: 0 elements differ at 4,096 x 14,336), but it runs slower (above).
_FUSED = [os.environ.get("RAYTUNE_LLM_FUSED_MLP_PRODUCTS", "0") == "1"]


@triton.jit
def _rows_t(L_ptr, stride_l, rows, row_ok, k, rank, UPCAST: tl.constexpr):
    # L[rows, :rank]^T, [R_PAD, BN]: a rank-r left factor for the transposed tile's rank updates
    lt = tl.load(L_ptr + rows[None, :] * stride_l + k[:, None], mask=row_ok[None, :] & (k[:, None] < rank), other=0.0)
    if UPCAST:  # the CPU interpreter gets bf16 tl.dot wrong
        lt = lt.to(tl.float32)
    return lt


@triton.jit
def _pair_dots_t(m, r_blk_t, lt, rows, row_ok, k, PP_ptr, q_acc, pid_c, n_rows, R_PAD: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, WANT_P: tl.constexpr, WANT_Q: tl.constexpr):  # fmt: skip
    # lora_pair's two dots for one transposed tile m [BK, BN] (rounded to the stored dtype): this column block's
    # share of P^T = R^T m for these rows ([R_PAD, BN]; the same products, summed over the same BK, as its m R), and
    # Q += m L[rows] ([BK, R_PAD]; lt is L[rows]^T).
    if UPCAST:
        m = m.to(tl.float32)
    if WANT_P:
        p = tl.dot(r_blk_t, m, input_precision=DOT_PREC)
        tl.store(PP_ptr + (pid_c * n_rows + rows[None, :]) * R_PAD + k[:, None], p, mask=row_ok[None, :])
    if WANT_Q:
        q_acc += tl.dot(m, tl.trans(lt), input_precision=DOT_PREC)
    return q_acc


@triton.jit
def _r_block(R_ptr, stride_r0, stride_r1, cols, col_ok, k, rank, UPCAST: tl.constexpr):
    # R's rows of this column block, [BK, R_PAD], as lora_pair loads them
    r = tl.load(R_ptr + cols[:, None] * stride_r0 + k[None, :] * stride_r1, mask=col_ok[:, None] & (k[None, :] < rank),
                other=0.0)  # fmt: skip
    if UPCAST:
        r = r.to(tl.float32)
    return r


@triton.jit
def _block(AD_ptr, stride_ad, BG_ptr, stride_bg0, stride_bg1, BU_ptr, stride_bu0, stride_bu1, n_cols, rank_d, rank_g,
           rank_u, BK: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    # This program's row span and column block, and the adapters' rows of the block: A_d^T's, B_g's, B_u's
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c.to(tl.int64) * BK + tl.arange(0, BK)
    k = tl.arange(0, R_PAD)
    col_ok = cols < n_cols
    r_h = _r_block(AD_ptr, 1, stride_ad, cols, col_ok, k, rank_d, UPCAST)
    r_g = _r_block(BG_ptr, stride_bg0, stride_bg1, cols, col_ok, k, rank_g, UPCAST)
    r_u = _r_block(BU_ptr, stride_bu0, stride_bu1, cols, col_ok, k, rank_u, UPCAST)
    return pid_r, pid_c, cols, col_ok, k, r_h, r_g, r_u


@triton.jit
def _row_tile(first_row, BN: tl.constexpr, cols, col_ok, n_rows, n_cols):
    # A transposed [BK, BN] tile's rows, their mask and its offsets into the row-major [N, I] tensors
    rows = first_row + tl.arange(0, BN)
    row_ok = rows < n_rows
    return rows, row_ok, col_ok[:, None] & row_ok[None, :], rows[None, :] * n_cols + cols[:, None]


@triton.jit
def _finish_t(x, r_blk, lt, scale, OUT_ptr, DOT_PREC: tl.constexpr, RNE_BF16: tl.constexpr):
    # A projection's base output tile (transposed, fp32) plus its rank update, rounded to OUT's dtype as
    # kernels.lora_swiglu's _finish_projection rounds it
    x = x + scale * tl.dot(r_blk, lt, input_precision=DOT_PREC)
    if RNE_BF16:
        x = rne_bf16(x)
    return x.to(OUT_ptr.dtype.element_ty)


@triton.jit
def _lora_swiglu_grad_kernel(
    DH_ptr, G_ptr, U_ptr, LOW_ptr, AD_ptr, XAG_ptr, XAU_ptr, BG_ptr, BU_ptr,
    PPH_ptr, QPH_ptr, PPG_ptr, QPG_ptr, PPU_ptr, QPU_ptr,
    stride_low, stride_ad, stride_xag, stride_xau, stride_bg0, stride_bg1, stride_bu0, stride_bu1,
    n_rows, n_cols, rank_d, rank_g, rank_u, scale_g, scale_u,
    ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr,
    FINISH_G: tl.constexpr, FINISH_U: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    RNE_BF16: tl.constexpr, WANT_PH: tl.constexpr, WANT_QH: tl.constexpr, WANT_QG: tl.constexpr,
    WANT_QU: tl.constexpr,
):  # fmt: skip
    # Tiles are held transposed, [BK columns, BN rows]: every dot then has BK as its long side (the rank updates
    # and the Q products as [BK, r] x [r, BN] and [BK, BN] x [BN, r]), so the warps split it instead of each holding
    # a [BN, BK] result (a [16, 256] rank update held whole by each of 8 warps spilled ~3 KB a thread, by ptxas).
    pid_r, pid_c, cols, col_ok, k, r_h, r_g, r_u = _block(
        AD_ptr, stride_ad, BG_ptr, stride_bg0, stride_bg1, BU_ptr, stride_bu0, stride_bu1, n_cols, rank_d, rank_g,
        rank_u, BK, R_PAD, UPCAST,
    )  # fmt: skip
    q_h = tl.zeros((BK, R_PAD), dtype=tl.float32)
    q_g = tl.zeros((BK, R_PAD), dtype=tl.float32)
    q_u = tl.zeros((BK, R_PAD), dtype=tl.float32)
    row0 = pid_r.to(tl.int64) * ROWS
    for i in range(0, ROWS, BN):
        rows, row_ok, mask, offs = _row_tile(row0 + i, BN, cols, col_ok, n_rows, n_cols)
        # the unfused backward kernel's tile (kernels/lora_swiglu.py), transposed, step for step: each rank update
        # sums the same r products per element in one tensor-core step
        low_t = _rows_t(LOW_ptr, stride_low, rows, row_ok, k, rank_d, UPCAST)
        xag_t = _rows_t(XAG_ptr, stride_xag, rows, row_ok, k, rank_g, UPCAST)
        xau_t = _rows_t(XAU_ptr, stride_xau, rows, row_ok, k, rank_u, UPCAST)
        dh = tl.load(DH_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dh = dh + 1.0 * tl.dot(r_h, low_t, input_precision=DOT_PREC)
        g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if FINISH_G:  # the forward kernel's finishing step, rounded as it stores
            g = _finish_t(g, r_g, xag_t, scale_g, G_ptr, DOT_PREC, RNE_BF16).to(tl.float32)
        if FINISH_U:
            u = _finish_t(u, r_u, xau_t, scale_u, U_ptr, DOT_PREC, RNE_BF16).to(tl.float32)
        h, dg, du = swiglu_grad_tile(dh, g, u, RNE_BF16)
        h = h.to(G_ptr.dtype.element_ty)
        dg = dg.to(G_ptr.dtype.element_ty)
        du = du.to(G_ptr.dtype.element_ty)
        tl.store(G_ptr + offs, dg, mask=mask)
        tl.store(U_ptr + offs, du, mask=mask)
        # lora_pair's dots on the stored values: masked elements are zeros there as here
        q_h = _pair_dots_t(h, tl.trans(r_h), low_t, rows, row_ok, k, PPH_ptr, q_h, pid_c, n_rows, R_PAD, UPCAST,
                           DOT_PREC, WANT_PH, WANT_QH)  # fmt: skip
        q_g = _pair_dots_t(dg, tl.trans(r_g), xag_t, rows, row_ok, k, PPG_ptr, q_g, pid_c, n_rows, R_PAD, UPCAST,
                           DOT_PREC, True, WANT_QG)  # fmt: skip
        q_u = _pair_dots_t(du, tl.trans(r_u), xau_t, rows, row_ok, k, PPU_ptr, q_u, pid_c, n_rows, R_PAD, UPCAST,
                           DOT_PREC, True, WANT_QU)  # fmt: skip
    q_offs = (pid_r * n_cols + cols[:, None]) * R_PAD + k[None, :]
    if WANT_QH:
        tl.store(QPH_ptr + q_offs, q_h, mask=col_ok[:, None])
    if WANT_QG:
        tl.store(QPG_ptr + q_offs, q_g, mask=col_ok[:, None])
    if WANT_QU:
        tl.store(QPU_ptr + q_offs, q_u, mask=col_ok[:, None])


@triton.jit
def _lora_swiglu_fwd_ha_kernel(
    G_ptr, U_ptr, H_ptr, XAG_ptr, XAU_ptr, BG_ptr, BU_ptr, AD_ptr, PP_ptr,
    stride_xag, stride_xau, stride_bg0, stride_bg1, stride_bu0, stride_bu1, stride_ad,
    n_rows, n_cols, rank_g, rank_u, rank_d, scale_g, scale_u,
    ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, RNE_BF16: tl.constexpr, STORE_GU: tl.constexpr,
):  # fmt: skip
    # kernels.lora_swiglu's forward kernel (finish G and U, H = silu(G) U), on transposed tiles walked as
    # lora_pair walks them, with H A_d^T's partials from the rounded H tile: the down projection's rank-r input
    # without reading H again.
    pid_r, pid_c, cols, col_ok, k, r_h, r_g, r_u = _block(
        AD_ptr, stride_ad, BG_ptr, stride_bg0, stride_bg1, BU_ptr, stride_bu0, stride_bu1, n_cols, rank_d, rank_g,
        rank_u, BK, R_PAD, UPCAST,
    )  # fmt: skip
    r_h_t = tl.trans(r_h)
    row0 = pid_r.to(tl.int64) * ROWS
    for i in range(0, ROWS, BN):
        rows, row_ok, mask, offs = _row_tile(row0 + i, BN, cols, col_ok, n_rows, n_cols)
        xag_t = _rows_t(XAG_ptr, stride_xag, rows, row_ok, k, rank_g, UPCAST)
        xau_t = _rows_t(XAU_ptr, stride_xau, rows, row_ok, k, rank_u, UPCAST)
        g = _finish_t(tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32), r_g, xag_t, scale_g, G_ptr,
                      DOT_PREC, RNE_BF16)  # fmt: skip
        u = _finish_t(tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32), r_u, xau_t, scale_u, U_ptr,
                      DOT_PREC, RNE_BF16)  # fmt: skip
        h = swiglu_store_tile(G_ptr, U_ptr, H_ptr, offs, mask, g, u, STORE_GU, RNE_BF16)
        tl.store(H_ptr + offs, h, mask=mask)
        if UPCAST:
            h = h.to(tl.float32)
        p = tl.dot(r_h_t, h, input_precision=DOT_PREC)  # lora_pair's P share, transposed
        tl.store(PP_ptr + (pid_c * n_rows + rows[None, :]) * R_PAD + k[:, None], p, mask=row_ok[None, :])


def _launch(G: torch.Tensor, ranks) -> tuple:
    """``(grid, options)`` of a fused kernel over ``G`` ``[n, inter]``: lora_pair's column blocks and row spans, and
    the compile-time options both kernels take (the tile, the interpreter's upcasts and rounding)."""
    n, inter = G.shape
    interp = interpret_mode()
    bn, warps, *more = _TILE_INTERPRET if interp else _TILE  # more: (num_stages, log2 of the span's split)
    pair_bn, bk, _ = pair_mod._TILE_INTERPRET if interp else pair_mod._TILE
    n_cb = triton.cdiv(inter, bk)
    rows = _rows_per_program(n, n_cb, pair_bn)  # lora_pair's spans (a power of two >= its BN, a multiple of ours)
    rows = max(bn, rows >> (more[1] if len(more) > 1 else 0))
    options = dict(ROWS=rows, BN=bn, BK=bk, R_PAD=max(16, triton.next_power_of_2(max(ranks))), UPCAST=interp)
    options.update(DOT_PREC="ieee" if interp else "tf32", RNE_BF16=interp and G.dtype == torch.bfloat16)
    return (triton.cdiv(n, rows), n_cb), options | {"num_warps": warps} | ({"num_stages": more[0]} if more else {})


def lora_swiglu_forward_ha(G, U, xa_g, xa_u, Bg, Bu, Ad, scale_g, scale_u, store_gu):
    """`kernels.lora_swiglu.lora_swiglu_forward` and ``H A_d^T`` (as `lora_pair` forms it), in one pass.

    Returns:
        ``(H, H A_d^T)``: ``[N, I]`` and ``[N, r_d]`` in ``G``'s dtype.
    """
    n, inter = G.shape
    ranks = (xa_g.shape[1], xa_u.shape[1], Ad.shape[0])
    grid, options = _launch(G, ranks)
    H = torch.empty_like(G)
    pp = torch.empty(grid[1], n, options["R_PAD"], dtype=torch.float32, device=G.device)
    if n and inter:
        _lora_swiglu_fwd_ha_kernel[grid](
            G, U, H, xa_g, xa_u, Bg, Bu, Ad, pp,
            xa_g.stride(0), xa_u.stride(0), Bg.stride(0), Bg.stride(1), Bu.stride(0), Bu.stride(1), Ad.stride(0),
            n, inter, *ranks, scale_g, scale_u,
            STORE_GU=store_gu, **options,
        )  # fmt: skip
    return H, _sum_partials(pp, ranks[2], G.dtype)


def _fused(G: torch.Tensor, *ranks: int) -> bool:
    """Whether the MLP's kernels run fused: bf16/fp16 with the products paired (`kernels.lora_pair._PAIRED`) and
    ranks up to 16 (above, the tile spills: 352 B a thread at 32, 1,760 B at 64, compiled for sm_90; untimed)."""
    return _FUSED[0] and pair_mod._PAIRED[0] and G.dtype in (torch.bfloat16, torch.float16) and max(ranks) <= 16


def swiglu_forward_products(G, U, xa_g, xa_u, Bg, Bu, Ad, scale_g, scale_u, store_gu):
    """``(H, H A_d^T)`` of the MLP forward: fused (`lora_swiglu_forward_ha`) where `_fused` says, else the forward
    kernel and `_products`."""
    if _fused(G, xa_g.shape[1], xa_u.shape[1], Ad.shape[0]):
        return lora_swiglu_forward_ha(G, U, xa_g, xa_u, Bg, Bu, Ad, scale_g, scale_u, store_gu)
    H = lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, scale_g, scale_u, store_gu=store_gu)
    return H, _products(H, Ad.t(), None, 1.0, G.dtype)[0]


def lora_swiglu_grad(dH, G, U, low_d, Ad, xa_g, xa_u, Bg, Bu, scale_g, scale_u, finish_gate, finish_up, want, q_dtypes):
    """The MLP backward's activation gradients and its six rank-r products, unscaled, in one pass.

    ``dH + low_d @ Ad`` in registers; ``G <- dG``, ``U <- dU`` (in place; ``dH`` is left as it was, ``H`` never written);
    returns ``(H A_d^T, H^T low_d, dG B_g, dG^T xa_g, dU B_u, dU^T xa_u)``, each None where ``want`` says so.

    Args:
        dH: ``dY W_d`` ``[N, I]``, contiguous, bf16 or fp16.
        G, U: ``[N, I]``, contiguous: the finished projections, or the base outputs to finish (``finish_*``).
        low_d: ``s_d dY B_d`` ``[N, r_d]`` (unit column stride).
        Ad: ``[r_d, I]``, contiguous.
        xa_g, xa_u: ``X A_g^T``, ``X A_u^T`` (unit column stride).
        Bg, Bu: ``[I, r]`` in ``G``'s dtype.
        scale_g, scale_u: the LoRA scalings of gate and up (for finishing them).
        finish_gate, finish_up: ``G`` / ``U`` hold base GEMM outputs, finished here as the forward kernel does.
        want: six booleans, one per product in the order returned; ``dG B_g`` and ``dU B_u`` are always formed.
        q_dtypes: the dtypes of the three ``[I, r]`` products (H's, dG's, dU's); the ``[N, r]`` ones take ``G``'s.
    """
    n, inter = G.shape
    ranks = (low_d.shape[1], xa_g.shape[1], xa_u.shape[1])
    (n_rb, n_cb), options = _launch(G, ranks)
    r_pad = options["R_PAD"]
    want = [bool(w) for w in want]
    want[2] = want[4] = True
    dev = G.device
    pp = [torch.empty(n_cb, n, r_pad, dtype=torch.float32, device=dev) if want[2 * j] else None for j in range(3)]
    qp = [
        torch.empty(n_rb, inter, r_pad, dtype=torch.float32, device=dev) if want[2 * j + 1] else None for j in range(3)
    ]
    if n and inter:
        _lora_swiglu_grad_kernel[(n_rb, n_cb)](
            dH, G, U, low_d, Ad, xa_g, xa_u, Bg, Bu,
            *[t if t is not None else G for pair in zip(pp, qp) for t in pair],
            low_d.stride(0), Ad.stride(0), xa_g.stride(0), xa_u.stride(0),
            Bg.stride(0), Bg.stride(1), Bu.stride(0), Bu.stride(1),
            n, inter, *ranks, scale_g, scale_u,
            FINISH_G=finish_gate, FINISH_U=finish_up, WANT_PH=want[0], WANT_QH=want[1], WANT_QG=want[3],
            WANT_QU=want[5], **options,
        )  # fmt: skip
    out = []
    for j in range(3):
        out.append(_sum_partials(pp[j], ranks[j], G.dtype) if want[2 * j] else None)
        out.append(_sum_partials(qp[j], ranks[j], q_dtypes[j]) if want[2 * j + 1] else None)
    return tuple(out)


def swiglu_backward_products(dH, G, U, dYB, Ad, XA, ranks, Bg, Bu, scalings, lean, finish_up, need, dtypes):
    """The MLP backward from ``dH = dY W_d`` on: ``G <- dG``, ``U <- dU`` and the adapters' rank-r products, scaled.

    Fused (`lora_swiglu_grad`) where `_fused` says, else the backward kernel and `_products` (see the module
    docstring for how their bits compare).

    Args:
        lean: a lean recompute (no forward ``H A_d^T``): ``G`` and ``U`` hold the base outputs, finished here with
            their rank updates as the forward kernel would, and ``H A_d^T`` is formed here.
        finish_up: ``U`` alone holds the base output (the gate's was kept from the forward).
        need: whether each adapter (A_g, B_g, A_u, B_u, A_d, B_d) needs its gradient; ``dtypes``: their dtypes.

    Returns:
        ``(H A_d^T, H^T dYB, s_g dG B_g, s_g dG^T xa_g, s_u dU B_u, s_u dU^T xa_u)``: ``H A_d^T`` only when ``lean``,
        the ``[I, r]`` ones where ``need`` asks.
    """
    sg_, su_ = scalings
    xa_g, xa_u = torch.split(XA, ranks, dim=1)
    finish = (xa_g, xa_u, Bg, Bu, sg_, su_) if lean or finish_up else None
    if _fused(G, *ranks, Ad.shape[0]):
        want = (lean, need[4], True, need[1], True, need[3])
        ha, qh, pg, qg, pu, qu = lora_swiglu_grad(
            dH, G, U, dYB, Ad, xa_g, xa_u, Bg, Bu, sg_, su_, finish is not None and lean, finish is not None,
            want, (dtypes[4], dtypes[1], dtypes[3]),
        )  # fmt: skip
        return (ha, qh, *[t if t is None else _scaled(t, s) for t, s in ((pg, sg_), (qg, sg_), (pu, su_), (qu, su_))])
    lora_swiglu_backward(dH, G, U, dYB, Ad, finish, finish_gate=lean)
    H, dG, dU = dH, G, U  # H written over dH
    ha, qh = _products(H, Ad.t() if lean else None, dYB if need[4] else None, 1.0, dtypes[4])
    return (ha, qh, *_products(dG, Bg, xa_g if need[1] else None, sg_, dtypes[1]),
            *_products(dU, Bu, xa_u if need[3] else None, su_, dtypes[3]))  # fmt: skip
