"""Fused LoRA projections (O, QKV) and the fused LoRA SwiGLU MLP, with hand-derived backward passes.

One projection (PEFT layout: ``A = lora_A.weight [r, in]``, ``B = lora_B.weight [out, r]``,
``s = scaling = lora_alpha / r``), for ``X [N, in]`` (leading dims flattened)::

    XA = X A^T                       [N, r]
    Y  = X W^T + s * XA B^T          [N, out]      W frozen [out, in], dense or NF4

Backward, given ``dY [N, out]``::

    dX = dY W + s * (dY B) A         [N, in]       (the base GEMM, then one rank-r update)
    dA = s * (dY B)^T X              [r, in]
    dB = s * dY^T XA                 [out, r]
    dW = none                        (frozen; NF4 is dequantized again, never saved)

QKV shares one read of ``X``: ``XA`` for all three comes from one GEMM against ``[A_q; A_k; A_v]``,
and ``dX = sum_p dY_p W_p + [s_q dY_q B_q, s_k dY_k B_k, s_v dY_v B_v] [A_q; A_k; A_v]`` (the three
rank updates are one GEMM of inner size ``3r``); ``dA_p`` come out of one GEMM the same way.

MLP (``LlamaMLP`` with LoRA on gate, up and down; ``I`` = intermediate size)::

    G = gate(X), U = up(X)           [N, I]        (projections as above)
    H = silu(G) * U                  [N, I]        silu(g) = g * sigmoid(g)
    Y = down(H)                      [N, hidden]

Backward, given ``dY``, writing ``sg = sigmoid(G)``::

    dH   = dY W_d + s_d (dY B_d) A_d
    dA_d = s_d (dY B_d)^T H,     dB_d = s_d dY^T (H A_d^T)
    dG   = dH * U * sg * (1 + G * (1 - sg))         (d silu(g)/dg = sg + g sg (1 - sg))
    dU   = dH * silu(G)
    dA_g = s_g (dG B_g)^T X,     dB_g = s_g dG^T (X A_g^T)      (same for up with dU)
    dX   = dG W_g + dU W_u + [s_g dG B_g, s_u dU B_u] [A_g; A_u]

Saved for backward, and why: ``X`` (for dA_g/dA_u), the pre-activations ``G`` and ``U`` (the
activation and its derivative are recomputed from them; saving ``H`` as well would add a third
``[N, I]`` tensor), the rank-r products ``X [A_g; A_u]^T`` and ``H A_d^T`` (``[N, r]``, so dB costs
no recompute of a full GEMM), and the (cast) adapters. Not saved: ``H``, any dequantized weight.
The backward's fused Triton kernel reads ``dY W_d``, ``G``, ``U`` and ``s_d dY B_d``, finishes
``dH`` with the rank update in registers and writes ``H`` over ``dH``, ``dG`` over ``G`` and ``dU``
over ``U``: no new ``[N, I]`` buffers, which is why running this backward twice
(``retain_graph=True``) raises instead of silently using overwritten activations. Inside
`lean_recompute` (a checkpointed layer's recompute, whose MLP output nothing reads) the forward runs no
Triton kernel at all: it saves the base outputs of gate and up, and the backward kernel adds their rank
updates itself (rounded as the forward kernel stores them, so the same bits) before writing ``H``, from
which backward then takes ``H A_d^T``. One ``[N, I]`` pass (read ``G``, ``U``, write ``G``, ``U``, ``H``)
fewer per recomputed layer.

Dtype policy: all GEMMs run in the compute dtype ``x.dtype`` (bf16 in training: tensor cores,
fp32 accumulation in cuBLAS), never in fp32 adapters. fp32 master ``A``/``B`` are cast to
``x.dtype`` inside the op (``r x in`` elements, cheap: one multi-tensor copy per fused call) and their
gradients are returned in ``A.dtype``/``B.dtype``: on CUDA the gradient GEMMs (compute-dtype inputs)
write fp32 themselves, elsewhere the product in ``x.dtype`` is cast. A dense base of another dtype is cast
to ``x.dtype``; an NF4 base is dequantized straight to ``x.dtype`` (Triton, kernels/nf4.py). The
activation kernels load in the tensor dtype, compute in fp32 and round once on store.

Where Triton is used, and where not: the base GEMMs stay on cuBLAS (``torch.matmul``, already at the
matmul ceiling). For O and QKV the rank-r update ``s * XA B^T`` is one in-place ``addmm_`` (cuBLAS,
``beta=1``: a rank-r GEMM whose epilogue adds into ``Y``, bf16 tensor cores; one extra read and write
of ``Y``). In the MLP, where the
``[N, I]`` tensors dominate the traffic, one Triton kernel adds both rank-r updates of gate and up
(a ``[BM, r] x [r, BN]`` ``tl.dot`` per tile) and applies SwiGLU, writing ``G``, ``U`` and ``H`` (``H`` alone
in a forward without grad that keeps nothing: a checkpointed layer's) in one pass instead of two ``addmm_``
passes plus an activation kernel; the backward kernel does the same for ``dH``'s rank update and the activation's
derivative (both in kernels/lora_swiglu.py). In bf16 each adapter's two backward products of one operand (``dY B``
and ``dY^T (X A^T)``; ``dG``'s, ``dU``'s, ``H``'s) come from one read of it (kernels/lora_pair.py). NF4: kernels/nf4.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from raytune_llm.kernels import reference
from raytune_llm.kernels._dispatch import use_triton
from raytune_llm.kernels.lora_pair import _joint_grad, _products
from raytune_llm.kernels.lora_swiglu import lora_swiglu_backward, lora_swiglu_forward
from raytune_llm.kernels.lora_thin import thin_product
from raytune_llm.kernels.nf4 import NF4Weight, nf4_dequantize

__all__ = [
    "dequantize_once",
    "keep_mlp_outputs",
    "reuse_mlp_outputs",
    "lean_recompute",
    "LoRAMLPFunction",
    "LoRAProjectionsFunction",
    "LoRAWeight",
    "lora_linear",
    "lora_mlp",
    "lora_qkv",
    "lora_swiglu_backward",
    "lora_swiglu_forward",
]


class LoRAWeight(NamedTuple):
    """One LoRA-adapted linear layer, in PEFT's layout.

    Attributes:
        base: the frozen weight ``[out, in]`` (a tensor) or an :class:`~raytune_llm.kernels.nf4.NF4Weight`, or a
            zero-argument callable returning one, resolved at each use (forward and backward), for a weight that
            moves between host and device in between (`models.host_weights`).
        A: ``lora_A.weight`` ``[r, in]``.
        B: ``lora_B.weight`` ``[out, r]``.
        scaling: ``lora_alpha / r`` (PEFT's ``layer.scaling[adapter]``).
    """

    base: torch.Tensor | NF4Weight | Callable[[], torch.Tensor | NF4Weight]
    A: torch.Tensor
    B: torch.Tensor
    scaling: float


# Stack of open `dequantize_once` blocks (the innermost is used). Module-level, not thread-local: on CUDA
# the recompute and its backward run on autograd's device thread, not on the thread that called backward.
_once: list[dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]] = []


@contextlib.contextmanager
def dequantize_once() -> Iterator[None]:
    """Inside this block each NF4 base weight is dequantized once for two uses.

    The first ``_dense`` of a weight keeps the bf16 copy; the second one takes it and forgets it. A
    checkpointed layer's backward is exactly that: the recompute's forward dequantizes each of its
    weights, the backward that follows needs each again for ``dX``. The cost is one layer's weights
    held in the compute dtype (all of them once the recompute has run: 0.44 GiB at 8B, 1.6 GiB at
    70B); the saving is one dequantization pass over the whole model per step. Copies still held
    when the block ends (a weight whose ``dX`` was not needed) are dropped.
    """
    cache: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
    _once.append(cache)
    try:
        yield
    finally:
        _once.pop()
        cache.clear()


def _cast_adapters(
    As: list[torch.Tensor], others: list[torch.Tensor], dt: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The A adapters joined (``[sum r, in]``) and the ``others``, in the compute dtype ``dt``: fp32 masters through
    one multi-tensor copy into one buffer (one kernel on CUDA, where a concatenation and 5-6 casts ran). Same values."""
    ts = [t.detach() for t in (*As, *others)]
    if all(t.dtype == dt for t in ts):
        return _cat(list(As)), list(others)
    flat = torch.empty(sum(t.numel() for t in ts), dtype=dt, device=ts[0].device)
    views, at = [], 0
    for t in ts:
        views.append(flat[at : at + t.numel()].view(t.shape))
        at += t.numel()
    torch._foreach_copy_(views, ts)
    rows = sum(a.shape[0] for a in As)
    return flat[: rows * As[0].shape[1]].view(rows, As[0].shape[1]), views[len(As) :]


# Depth of open `lean_recompute` blocks; module-level for the same reason as `_once`.
_lean: list[bool] = []


@contextlib.contextmanager
def lean_recompute(qkv: bool = False) -> Iterator[None]:
    """Inside this block, `lora_mlp` run with grad enabled skips its down projection and returns zeros.

    A checkpointed layer's backward runs the layer's forward again only to rebuild what its backward
    saves. The MLP saves ``X``, ``G``, ``U``, ``X A^T`` and ``H A_d^T``; its output ``Y = down(H)`` is
    not among them, and in a pre-norm decoder layer (every family `models.patch` fuses) ``Y`` only
    feeds the residual add, whose backward reads no values. So the recompute can skip the down
    projection's base GEMM (``2 N I hidden`` FLOPs, a quarter of a Llama layer's forward GEMMs), its
    dequantization and its rank-r update. ``Y`` is then a broadcast view of one zero: its graph is
    exact, its values are not the layer's. Use this only around a forward whose outputs' values are
    never read, only back-propagated through. Outside the block, or under ``torch.no_grad`` (nothing
    will be back-propagated, so the value must be the real one), `lora_mlp` is unchanged.

    With ``qkv=True``, `lora_qkv` also skips its three base GEMMs (and their dequantization) and returns
    uninitialised Q, K and V: only for a recompute whose attention does not read them, because it
    replays the forward's attention with the q, k, v it kept (`models.attention_stash`), and nothing else
    does (no q/k norm: its backward would read them). The adapters' ``X A^T`` is still computed and saved.
    """
    _lean.append(qkv)
    try:
        yield
    finally:
        _lean.pop()


def lean_qkv_active() -> bool:
    """Whether `lora_qkv` called now returns uninitialised Q, K and V (inside `lean_recompute(qkv=True)`, with grad):
    what is computed from them then only needs its graph, not its values (`models.patch` runs no RoPE on them)."""
    return bool(_lean) and _lean[-1] and torch.is_grad_enabled()


# Open `keep_mlp_outputs` / `reuse_mlp_outputs` blocks (the innermost is used); module-level as `_once` is.
_keep: list[list] = []
_reuse: list[list] = []


@contextlib.contextmanager
def keep_mlp_outputs(store: list | None) -> Iterator[None]:
    """Inside this block, `lora_mlp` run without grad keeps its finished gate and up outputs in ``store``.

    A checkpointed layer's forward runs without grad and frees ``G`` and ``U`` (``[N, I]`` each); its
    recompute runs the gate and up GEMMs again only to rebuild them, the one recompute left under
    `lean_recompute` with a replayed attention (`models.attention_stash`): 2 x 1.23 ms a layer at 4x2048 tokens
    of Llama-3.1-8B on the H200. Kept instead, for ``2 N I`` elements held from this forward to the layer's
    backward (448 MiB at 4x2048 tokens of 8B), ``reuse_mlp_outputs`` around the recompute hands them back, in
    call order, with ``H A_d^T``: the recompute then runs no MLP GEMM and no activation kernel, and the backward
    gets the same tensors bit for bit (the lean backward kernel finishes ``G`` and ``U`` exactly as the forward
    kernel does). Entries are ``(G, U, H A_d^T)``; an entry handed back with ``U`` None (the gate's alone was kept:
    `models.checkpointing.checkpoint_layer` keep_gate_only) runs the up GEMM again and the backward kernel finishes
    it, the same bits. ``store=None`` keeps nothing inside an outer block (an MLP split over its tokens so as to hold
    no ``[N, I]`` tensor).
    """
    _keep.append(store)
    try:
        yield
    finally:
        _keep.pop()


@contextlib.contextmanager
def reuse_mlp_outputs(store: list) -> Iterator[None]:
    """Inside this block, a lean recompute's `lora_mlp` takes the next ``store`` entry instead of running its GEMMs
    (the up GEMM still runs for an entry whose ``U`` is None: the gate's alone was kept).

    ``store`` is what `keep_mlp_outputs` filled in the same layer's forward; an empty store (a forward whose MLP
    was split over tokens, or ran stock) leaves `lora_mlp` as it is. Only inside `lean_recompute`: without it
    the recompute would need ``H`` and the down projection's output, which are not kept.
    """
    _reuse.append(store)
    try:
        yield
    finally:
        _reuse.pop()


def _dense(base: torch.Tensor | NF4Weight, dtype: torch.dtype, last_use: bool = False) -> torch.Tensor:
    """The base weight ``[out, in]`` in the compute dtype: NF4 dequantized now (a temporary), or taken from
    the innermost `dequantize_once` block. ``last_use`` (the backward's ``dX``): a weight dequantized here is not
    kept for a second use; a layer's recompute skips some projections (the lean Q/K/V and down projection, an O
    projection inside a replayed stash), and holding those until the block ends only raised the peak."""
    if callable(base):  # resolved now: a weight that moves between host and device (models.host_weights)
        base = base()
    if not isinstance(base, NF4Weight):
        return base.detach().to(dtype)
    if not _once:
        return nf4_dequantize(base, dtype)
    cache = _once[-1]
    key = (base.packed.data_ptr(), dtype)
    # The entry holds the packed tensor too: its address cannot be handed to another weight while cached,
    # and a hit must be that very tensor.
    hit = cache.pop(key, None)
    if hit is not None and hit[0] is base.packed:
        return hit[1]
    w = nf4_dequantize(base, dtype)
    if not last_use:
        cache[key] = (base.packed, w)
    return w


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., in]`` -> ``[N, in]`` (a copy only when the view is impossible; matmul takes strides)."""
    return x.reshape(-1, x.shape[-1])


def _output(x: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh ``[..., out]`` output and its ``[N, out]`` view to compute into.

    The op returns the fresh tensor itself, not a view of a 2-D result: autograd forbids in-place
    edits of view outputs of a custom Function, and the fused RoPE rotates Q and K in place.
    """
    Y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    return Y, Y.view(-1, out_features)


def _split(t: torch.Tensor, ranks: list[int], dim: int) -> tuple[torch.Tensor, ...]:
    return torch.split(t, ranks, dim=dim) if len(ranks) > 1 else (t,)


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0) if len(ts) > 1 else ts[0]


# ---- autograd -----------------------------------------------------------------------------------


class LoRAProjectionsFunction(torch.autograd.Function):
    """``P`` LoRA projections of one input (``P = 1``: O; ``P = 3``: QKV).

    ``apply(x, bases, scalings, skip_output, A_1, B_1, ..., A_P, B_P)``: ``bases`` and ``scalings`` are
    tuples (no gradients); the adapters are positional so autograd tracks them. Saves ``X``, ``X A^T``
    (``[N, sum r]``) and the adapters cast to ``x.dtype``. ``skip_output`` (see `lean_recompute`) saves
    the same and returns uninitialised outputs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bases: tuple, scalings: tuple, skip_output: bool, *adapters: torch.Tensor):
        dt = x.dtype
        X = _rows(x)
        ranks = [a.shape[0] for a in adapters[0::2]]
        A_cat, Bs = _cast_adapters(list(adapters[0::2]), list(adapters[1::2]), dt)
        XA = thin_product(X, A_cat, adapters[0])  # one read of X for every projection's adapter (or the forward's)
        outs = []
        for base, s, B, xa in zip(bases, scalings, Bs, _split(XA, ranks, 1)):
            Y, Y2 = _output(x, B.shape[0])
            if not skip_output:
                torch.mm(X, _dense(base, dt).t(), out=Y2)
                Y2.addmm_(xa, B.t(), alpha=s)  # beta=1: the rank-r GEMM's epilogue adds into Y
            outs.append(Y)
        ctx.save_for_backward(X, XA, A_cat, *Bs)
        ctx.bases, ctx.scalings, ctx.ranks = bases, scalings, ranks
        ctx.adapter_dtypes = [t.dtype for t in adapters]
        ctx.x_shape = x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dYs: torch.Tensor):
        X, XA, A_cat, *Bs = ctx.saved_tensors
        dt = X.dtype
        need_x = ctx.needs_input_grad[0]
        dX = None
        low, dBs = [], []
        dYs2 = [_rows(dy).to(dt) for dy in dYs]
        for i, (base, s, B, dY, xa) in enumerate(zip(ctx.bases, ctx.scalings, Bs, dYs2, _split(XA, ctx.ranks, 1))):
            if need_x:
                W = _dense(base, dt, last_use=True)
                dX = dY @ W if dX is None else dX.addmm_(dY, W)
                del W
            # s dY B [N, r] and dB = s dY^T (X A^T), from one read of dY
            p, dB = _products(dY, B, xa if ctx.needs_input_grad[5 + 2 * i] else None, s, ctx.adapter_dtypes[2 * i + 1])
            low.append(p)
            dBs.append(dB)
        low_cat = torch.cat(low, dim=1) if len(low) > 1 else low[0]
        if need_x:
            dX.addmm_(low_cat, A_cat)  # all rank updates in one GEMM of inner size sum(r)
            dX = dX.view(ctx.x_shape)
        grads = []
        need_a = any(ctx.needs_input_grad[4::2])
        dA_all = (
            _split(_joint_grad(low_cat.t(), X, ctx.adapter_dtypes[0::2]), ctx.ranks, 0) if need_a else [None] * len(Bs)
        )
        for i, dB in enumerate(dBs):
            dA = dA_all[i].to(ctx.adapter_dtypes[2 * i]) if ctx.needs_input_grad[4 + 2 * i] else None
            grads += [dA, dB]
        return (dX, None, None, None, *grads)


class LoRAMLPFunction(torch.autograd.Function):
    """The LoRA SwiGLU MLP; see the module docstring for the math and what is saved.

    ``apply(x, bases, scalings, skip_output, kept, keep_to, store_gu, A_g, B_g, A_u, B_u, A_d, B_d)`` with
    ``bases``/``scalings`` tuples of three (gate, up, down); ``skip_output`` (see `lean_recompute`) saves the
    same tensors but leaves out the down projection and returns zeros. ``kept`` (``(G, U, H A_d^T)`` from
    `reuse_mlp_outputs`, with ``skip_output``) replaces the gate/up GEMMs and the activation kernel (``U`` None: the
    gate's alone; the up GEMM runs and the backward kernel finishes its output); ``keep_to``
    (a list from `keep_mlp_outputs`) receives those three after a full forward. ``store_gu`` False (a forward
    whose backward never runs and that keeps nothing: a checkpointed layer's) leaves the finished G and U unwritten:
    the activation kernel writes H alone (what the down projection reads).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        bases: tuple,
        scalings: tuple,
        skip_output: bool,
        kept: tuple | None,
        keep_to: list | None,
        store_gu: bool,
        *adapters: torch.Tensor,
    ):
        dt = x.dtype
        X = _rows(x)
        # adapters: A_g, B_g, A_u, B_u, A_d, B_d
        A_gu, (Bg, Bu, Ad, Bd) = _cast_adapters([adapters[0], adapters[2]], [adapters[i] for i in (1, 3, 4, 5)], dt)
        Ad = Ad.contiguous()  # the backward kernel reads A_d rows with unit stride
        sg_, su_, sd_ = scalings
        ranks = [adapters[0].shape[0], adapters[2].shape[0]]
        XA = thin_product(X, A_gu, adapters[0])  # [N, r_g + r_u], one read of X for both (or the forward's)
        xa_g, xa_u = torch.split(XA, ranks, dim=1)
        if kept is not None:  # a recompute that `reuse_mlp_outputs` serves: the forward's finished G, U and H A_d^T
            G, U, HA = kept
            if G.shape != (X.shape[0], Bg.shape[0]) or G.dtype != dt:
                raise RuntimeError(
                    f"lora_mlp: kept outputs {tuple(G.shape)} {G.dtype} do not match this call "
                    f"({X.shape[0]} tokens, {Bg.shape[0]} wide, {dt}): the recompute ran other inputs"
                )
            if U is None:  # the gate's alone (`checkpoint_layer` keep_gate_only): up's base GEMM, finished in backward
                U = X @ _dense(bases[1], dt).t()
        else:
            G = X @ _dense(bases[0], dt).t()
            U = X @ _dense(bases[1], dt).t()
            HA = None
        if kept is not None or skip_output:
            # Nothing reads H here: the backward kernel finishes G and U with their rank updates itself (unless kept,
            # then they are finished; U alone where the gate's alone was kept) and writes H, from which backward takes H
            # A_d^T. One [N, I] pass fewer per recomputed layer.
            Y = x.new_zeros(()).expand(*x.shape[:-1], Bd.shape[0])
        else:
            # rank updates + activation, one pass
            H = lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, sg_, su_, store_gu=store_gu)
            HA = _products(H, Ad.t(), None, 1.0, dt)[0]  # [N, r_d], as a lean recompute's backward forms it
            Y, Y2 = _output(x, Bd.shape[0])
            torch.mm(H, _dense(bases[2], dt).t(), out=Y2)
            Y2.addmm_(HA, Bd.t(), alpha=sd_)
            del H  # recomputed in backward from G and U
            if keep_to is not None:
                keep_to.append((G, U, HA))
        ctx.save_for_backward(X, G, U, XA, HA, A_gu, Bg, Bu, Ad, Bd)
        ctx.finish_up = kept is not None and kept[1] is None
        ctx.bases, ctx.scalings, ctx.ranks = bases, scalings, ranks
        ctx.adapter_dtypes = [t.dtype for t in adapters]
        ctx.x_shape = x.shape
        ctx.consumed = False
        return Y

    @staticmethod
    def backward(ctx, dY: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError("lora_mlp: backward ran twice on one forward (retain_graph); its saved G/U are reused")
        ctx.consumed = True
        X, G, U, XA, HA, A_gu, Bg, Bu, Ad, Bd = ctx.saved_tensors
        dt = X.dtype
        sg_, su_, sd_ = ctx.scalings
        need = ctx.needs_input_grad[7:]  # the adapters': A_g, B_g, A_u, B_u, A_d, B_d
        need_x = ctx.needs_input_grad[0]
        dY = _rows(dY).to(dt)

        # s_d dY B_d [N, r_d], with dB_d = s_d dY^T (H A_d^T) from the same read of dY where H A_d^T is at hand
        dYB, dB_d = _products(dY, Bd, HA if need[5] else None, sd_, ctx.adapter_dtypes[5])
        Wd = _dense(ctx.bases[2], dt, last_use=True)
        dH = dY @ Wd
        del Wd
        finish = None
        if HA is None or ctx.finish_up:  # G and U the base outputs (a lean recompute), or U alone (the gate kept)
            xa_g, xa_u = torch.split(XA, ctx.ranks, dim=1)
            finish = (xa_g, xa_u, Bg, Bu, sg_, su_)
        # dH += dYB Ad; then dH <- H, G <- dG, U <- dU
        lora_swiglu_backward(dH, G, U, dYB, Ad, finish, finish_gate=not ctx.finish_up)
        H, dG, dU = dH, G, U
        lean = HA is None  # dA_d^T = H^T (s_d dY B_d); in a lean recompute H A_d^T from the same read of H
        HA_, dA_dt = _products(H, Ad.t() if lean else None, dYB if need[4] else None, 1.0, ctx.adapter_dtypes[4])
        dA_d = dA_dt.t().contiguous() if dA_dt is not None else None
        if lean and need[5]:
            dB_d = _products(dY, None, HA_, sd_, ctx.adapter_dtypes[5])[1]
        del H, dH, HA_

        xa_g, xa_u = torch.split(XA, ctx.ranks, dim=1)
        # s dG B_g and dB_g = s dG^T (X A_g^T) from one read of dG; the same for up
        low_g, dB_g = _products(dG, Bg, xa_g if need[1] else None, sg_, ctx.adapter_dtypes[1])
        low_u, dB_u = _products(dU, Bu, xa_u if need[3] else None, su_, ctx.adapter_dtypes[3])
        low = torch.cat((low_g, low_u), dim=1)  # [N, r_g + r_u]
        dX = None
        if need_x:
            Wg = _dense(ctx.bases[0], dt, last_use=True)
            dX = dG @ Wg
            del Wg
            Wu = _dense(ctx.bases[1], dt, last_use=True)
            dX.addmm_(dU, Wu)
            del Wu
            dX.addmm_(low, A_gu)
            dX = dX.view(ctx.x_shape)
        dA_g = dA_u = None
        if need[0] or need[2]:
            dA_g, dA_u = torch.split(_joint_grad(low.t(), X, ctx.adapter_dtypes[0::2][:2]), ctx.ranks, dim=0)
            dA_g = dA_g.to(ctx.adapter_dtypes[0]) if need[0] else None
            dA_u = dA_u.to(ctx.adapter_dtypes[2]) if need[2] else None
        return (dX, None, None, None, None, None, None, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d)


# ---- functionals --------------------------------------------------------------------------------


def _check(x: torch.Tensor, ws: tuple[LoRAWeight, ...], names: tuple[str, ...]) -> None:
    for name, w in zip(names, ws):
        if not isinstance(w, LoRAWeight):
            raise TypeError(f"{name}: expected a LoRAWeight, got {type(w).__name__}")
        out_f, in_f = (tuple((w.base() if callable(w.base) else w.base).shape) + (None, None))[:2]
        if w.A.dim() != 2 or w.B.dim() != 2 or w.B.shape[1] != w.A.shape[0]:
            raise ValueError(
                f"{name}: A must be [r, in] and B [out, r], got A {tuple(w.A.shape)}, B {tuple(w.B.shape)}"
            )
        if (out_f, in_f) != (w.B.shape[0], w.A.shape[1]):
            raise ValueError(f"{name}: base {(out_f, in_f)} does not match A {tuple(w.A.shape)} / B {tuple(w.B.shape)}")


def _adapters(ws: tuple[LoRAWeight, ...]) -> list[torch.Tensor]:
    return [t for w in ws for t in (w.A, w.B)]


def lora_linear(x: torch.Tensor, w: LoRAWeight) -> torch.Tensor:
    """One LoRA projection ``x @ W^T + s * (x @ A^T) @ B^T`` (the attention output ``O``).

    Triton path on CUDA or under ``TRITON_INTERPRET=1``, otherwise ``reference.lora_linear``.

    Args:
        x: activations ``[..., in]`` in the compute dtype.
        w: the layer (base dense or NF4, A ``[r, in]``, B ``[out, r]``, scaling).

    Returns:
        ``[..., out]`` in ``x.dtype``. Gradients flow to ``x``, ``A`` and ``B`` (in their dtypes).

    Raises:
        TypeError, ValueError: on a malformed :class:`LoRAWeight` or mismatched shapes.
    """
    _check(x, (w,), ("w",))
    if x.shape[-1] != w.A.shape[1]:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features, the layer expects {w.A.shape[1]}")
    if not use_triton(x):
        return reference.lora_linear(x, w)
    return LoRAProjectionsFunction.apply(x, (w.base,), (float(w.scaling),), False, *_adapters((w,)))[0]


def lora_qkv(
    x: torch.Tensor, q: LoRAWeight, k: LoRAWeight, v: LoRAWeight
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q, K and V LoRA projections of one input, sharing the read of ``x`` and its gradient.

    Args:
        x: activations ``[..., hidden]``.
        q: query projection.
        k: key projection.
        v: value projection.

    Returns:
        ``(Q, K, V)``, ``[..., out_p]`` each, in ``x.dtype``.

    Raises:
        TypeError, ValueError: on a malformed :class:`LoRAWeight` or mismatched shapes.
    """
    ws = (q, k, v)
    _check(x, ws, ("q", "k", "v"))
    if any(x.shape[-1] != w.A.shape[1] for w in ws):
        raise ValueError(f"lora_qkv: x has {x.shape[-1]} features; q/k/v expect {[w.A.shape[1] for w in ws]}")
    if not use_triton(x):
        return reference.lora_qkv(x, q, k, v)
    skip_output = lean_qkv_active()
    return LoRAProjectionsFunction.apply(
        x, tuple(w.base for w in ws), tuple(float(w.scaling) for w in ws), skip_output, *_adapters(ws)
    )


def lora_mlp(x: torch.Tensor, gate: LoRAWeight, up: LoRAWeight, down: LoRAWeight) -> torch.Tensor:
    """The LoRA SwiGLU MLP ``down(silu(gate(x)) * up(x))``, each projection with its adapter.

    Args:
        x: activations ``[..., hidden]``.
        gate: ``[inter, hidden]`` projection.
        up: ``[inter, hidden]`` projection.
        down: ``[hidden, inter]`` projection.

    Returns:
        ``[..., hidden]`` in ``x.dtype``.

    Raises:
        TypeError, ValueError: on a malformed :class:`LoRAWeight` or mismatched shapes.
        RuntimeError: when its backward is run twice on one forward (``retain_graph=True``).
    """
    ws = (gate, up, down)
    _check(x, ws, ("gate", "up", "down"))
    if x.shape[-1] != gate.A.shape[1] or x.shape[-1] != up.A.shape[1]:
        raise ValueError(f"lora_mlp: x has {x.shape[-1]} features; gate/up expect {gate.A.shape[1]}/{up.A.shape[1]}")
    if gate.B.shape[0] != up.B.shape[0] or down.A.shape[1] != gate.B.shape[0]:
        raise ValueError(
            f"lora_mlp: intermediate sizes disagree: gate {gate.B.shape[0]}, up {up.B.shape[0]}, down {down.A.shape[1]}"
        )
    if not use_triton(x):
        return reference.lora_mlp(x, gate, up, down)
    skip_output = bool(_lean) and torch.is_grad_enabled()
    kept = _reuse[-1].pop(0) if skip_output and _reuse and _reuse[-1] else None
    keep_to = _keep[-1] if _keep and not torch.is_grad_enabled() else None
    # Without grad (a checkpointed layer's forward) nothing reads the finished G and U unless they are kept.
    store_gu = torch.is_grad_enabled() or keep_to is not None
    bases, scalings = tuple(w.base for w in ws), tuple(float(w.scaling) for w in ws)
    return LoRAMLPFunction.apply(x, bases, scalings, skip_output, kept, keep_to, store_gu, *_adapters(ws))
