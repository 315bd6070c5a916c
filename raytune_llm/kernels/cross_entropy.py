"""Fused LM-head projection + cross-entropy that never holds the full ``[N, V]`` logits.

Forward, for hidden states ``h [N, H]``, head weight ``W [V, H]``, labels ``y [N]``, with
``M = {i : y_i != ignore_index}`` and ``n = max(|M|, 1)``::

    z_i   = W h_i                                   # logits of token i, [V]
    lse_i = log sum_v exp(z_iv)
    L     = (1/n) * sum_{i in M} (lse_i - z_{i, y_i})

Backward (derived per token; ``p_i = softmax(z_i)``, ``e_y`` the one-hot of the label)::

    dL/dz_i = (p_i - e_{y_i}) / n     for i in M, 0 otherwise      (G_i, one row of G [N, V])
    dL/dh   = G W                                                   [N, H]
    dL/dW   = G^T h                                                 [V, H]
    dL/dy   : none (labels are integers)

All three are known during the forward, so the forward computes them there, chunk by chunk (as
Liger-Kernel does): for each chunk of ``C`` tokens, ``z = h_c @ W^T`` (a torch matmul, fp32
accumulation inside the GEMM, stored in the input dtype), then one Triton kernel per row makes two
passes over ``z``: an online max / sum-of-exponentials (fp32) giving ``lse`` and the row loss, then
``G`` written *in place over the chunk's logits*. ``dL/dh`` for the chunk is one matmul into its
slice of the ``[N, H]`` gradient; ``dL/dW`` is accumulated with ``addmm_`` only when ``W`` requires
grad (a frozen LoRA base head never pays for it). The backward only scales the stored gradients by
the upstream scalar. Peak extra memory: one ``[C, V]`` chunk + ``dL/dh`` (+ ``dL/dW``), never ``[N, V]``;
:func:`default_chunk_size` picks ``C``.

Dtype policy: logits in the input dtype (bf16 in training), read and reduced in fp32; the loss is
fp32; ``G`` is stored in the input dtype for the two gradient matmuls; every GEMM accumulates in fp32
inside; ``dL/dh`` rows are each written once, in ``h``'s dtype. ``dL/dW`` is the running sum over the
chunks in ``W``'s dtype, fp32 inside each chunk's GEMM and rounded once per chunk (Liger does the same):
an fp32 ``[V, H]`` accumulator costs 2 GiB more at Llama-3's head. At 32768 tokens on the H200 the error of
dL/dW against an fp32 computation (rms, relative) was 3.9e-3 summed in bf16 over 32 chunks (Liger's too) and
2.8e-3 with the fp32 accumulator over 8 chunks; the bf16 result's own rounding is most of it
(bench/kernels/sweep_flce.py, bench/results/flce_sweep_h200_20261129_s6a.json). An upstream
gradient other than 1 is applied to the stored gradients in fp32 and rounded once, one rounding more than
autograd's order (Liger has the same); a gradient of exactly 1 (a loss's own) costs one near-empty kernel,
decided on the device, where an unconditional multiply read and wrote dL/dW (2 GiB at Llama-3's head, 1 ms on
the H200, session 6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raytune_llm.kernels import reference
from raytune_llm.kernels._dispatch import kernel_store_dtype, row_block_settings, triton_next_power_of_2, use_triton

__all__ = [
    "FusedLinearCrossEntropyFunction",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_forward",
]

# Vocabulary block per loop step: 32768 fp32 values over 32 warps is 32 registers per thread, the
# largest block that still leaves room for two resident programs per SM; Llama-3's 128256-entry
# vocabulary takes 4 steps per pass (Liger uses the same block and warp count).
_MAX_VOCAB_BLOCK = 32768


@triton.jit
def _ce_row_kernel(
    LOGITS_ptr,
    stride_l,
    LABELS_ptr,
    LOSS_ptr,
    DENOM_ptr,
    n_cols,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS_ptr + row * stride_l
    label = tl.load(LABELS_ptr + row).to(tl.int64)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    offs = tl.arange(0, BLOCK)

    # Pass 1: online max and sum of exponentials (rescaled whenever the running max grows).
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    d = tl.zeros([], dtype=tl.float32)
    start = 0
    while start < n_cols:
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        start += BLOCK
    lse = m + tl.log(d)
    z_label = tl.load(row_ptr + safe_label).to(tl.float32)
    tl.store(LOSS_ptr + row, tl.where(valid, lse - z_label, 0.0))

    # Pass 2: G = (softmax - onehot) / n, over the logits in place; ignored rows get zeros. It walks the row back
    # from the block pass 1 read last, which is then still in L2 (forward order: 0.4-0.7% slower over the whole op
    # on the H200, trained and frozen head, bench/results/flce_sweep_h200_20261129_s6b.json).
    if COMPUTE_GRAD:
        scale = tl.where(valid, 1.0, 0.0) / tl.load(DENOM_ptr)
        n_blocks = (n_cols + BLOCK - 1) // BLOCK
        i = 0
        while i < n_blocks:
            start = (n_blocks - 1 - i) * BLOCK
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(cols == safe_label, g - 1.0, g) * scale
            tl.store(row_ptr + cols, g.to(LOGITS_ptr.dtype.element_ty), mask=mask)
            i += 1


@triton.jit
def _scale_kernel(X_ptr, n, G_ptr, BLOCK: tl.constexpr):
    """``x *= g`` in place, x read in fp32 and rounded once; every load and store masked off when ``g == 1``.

    The upstream gradient of a loss is almost always exactly 1; this skips the pass without reading it on the
    host (a device sync). A masked-off program reads nothing but ``g``.
    """
    g = tl.load(G_ptr).to(tl.float32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(g != 1.0, n, 0)
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(X_ptr + offs, (x * g).to(X_ptr.dtype.element_ty), mask=mask)


def _scale_unless_one(x: torch.Tensor, g: torch.Tensor) -> None:
    """Scale contiguous ``x`` in place by the device scalar ``g``; nothing read or written where ``g == 1``."""
    n = x.numel()
    if n:
        block = 4096
        _scale_kernel[(triton.cdiv(n, block),)](x, n, g.reshape(1), BLOCK=block, num_warps=8)


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: ``C = next_pow2(ceil(N / ceil(V / H)))`` (Liger's rule).

    The ``[C, V]`` logits then cost about as much memory as ``[N, H]``, so the fused op's extra memory stays
    ~1x the activations while chunks remain large enough (1024 tokens for 32768 x 4096 -> 128256) for
    efficient GEMMs. A trained head takes the same rule: every chunk's ``G^T h`` reads and writes the
    ``[V, H]`` gradient (2 GiB of traffic at Llama-3's head), so 2048-token chunks ran 3.8% faster on the
    H200, but each doubling adds a [C, V] chunk of memory (+250 MiB, above Liger's peak; sweep_flce.py).

    Args:
        n_tokens: N.
        hidden: H.
        vocab: V.

    Returns:
        The chunk size, at least 1.
    """
    inc = triton.cdiv(vocab, hidden)
    return max(1, triton_next_power_of_2(triton.cdiv(max(n_tokens, 1), inc)))


def fused_linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int | None,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss and, when asked, both gradients, chunk by chunk.

    Args:
        hidden: ``[N, H]``.
        weight: ``[V, H]``.
        labels: ``[N]`` integer ids.
        ignore_index: label that takes no part.
        chunk_size: tokens per chunk (None: :func:`default_chunk_size`).
        need_dh: compute ``dL/dh``.
        need_dw: compute ``dL/dW``.

    Returns:
        ``(loss fp32 scalar, dL/dh [N, H] or None, dL/dW [V, H] or None)`` for an upstream gradient of 1.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    labels = labels.contiguous()
    denom = (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
    loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
    grad_w = None
    if need_dw:  # the first chunk's G^T h is written, not added (no zeroing pass, no read of zeros)
        grad_w = (torch.empty_like if N else torch.zeros_like)(weight, memory_format=torch.contiguous_format)
    compute_grad = need_dh or need_dw
    C = chunk_size or default_chunk_size(N, H, V)
    BLOCK, num_warps = row_block_settings(min(V, _MAX_VOCAB_BLOCK))
    for start in range(0, N, C):
        end = min(start + C, N)
        h_c = hidden[start:end]
        logits = h_c @ weight.t()
        # Under the interpreter bf16 round-trips through fp32 (see kernel_store_dtype); a no-op on GPU.
        logits = logits.to(kernel_store_dtype(logits.dtype))
        _ce_row_kernel[(end - start,)](
            logits,
            logits.stride(0),
            labels[start:end],
            loss_rows[start:end],
            denom,
            V,
            ignore_index,
            COMPUTE_GRAD=compute_grad,
            BLOCK=BLOCK,
            num_warps=num_warps,
        )
        if not compute_grad:
            del logits
            continue
        G = logits.to(hidden.dtype)
        if need_dh:
            torch.mm(G, weight, out=grad_h[start:end])
        if need_dw and start == 0:
            torch.mm(G.t(), h_c, out=grad_w)
        elif need_dw:  # fp32 inside the GEMM, one rounding of the running sum per chunk
            grad_w.addmm_(G.t(), h_c)
        # Drop this chunk before the next matmul allocates its output: two [C, V] chunks alive at once
        # would add a third of Liger's whole extra memory at its own chunk size.
        del G, logits
    loss = loss_rows.sum() / denom
    return loss, grad_h, grad_w


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: the gradients are made in the forward; the backward scales them by the upstream scalar.

    The scaling is in place, so one forward supports one backward (a second raises).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int | None):
        loss, grad_h, grad_w = fused_linear_cross_entropy_forward(
            hidden, weight, labels, ignore_index, chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward can run once per forward (gradients are made in the forward)"
            )
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # Testing grad_output == 1 on the host would cost a device sync: the kernel tests it on the device.
        for grad in (grad_h, grad_w):
            if grad is not None:
                _scale_unless_one(grad, grad_output.detach().to(torch.float32))
        return grad_h, grad_w, None, None, None


def check_loss_inputs(name: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    """The checks a linear + CE loss makes of its operands (also `kernels.cross_entropy_streamed`'s): hidden
    ``[N, H]``, weight ``[V, H]`` of hidden's dtype, labels ``[N]`` integer ids. ValueError naming ``name``."""
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{name}: need hidden [N, H] and weight [V, H], got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"{name}: labels must be [{hidden.shape[0]}], got {list(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name}: labels must be integer ids, got {labels.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden is {hidden.dtype} but weight is {weight.dtype}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, without materialising the logits.

    Runs the chunked Triton path on CUDA or under ``TRITON_INTERPRET=1``, otherwise
    ``reference.fused_linear_cross_entropy``. The caller shifts labels.

    Args:
        hidden: ``[N, H]`` final hidden states (flatten ``[B, S, H]`` first).
        weight: ``[V, H]`` LM head weight, same dtype as ``hidden``.
        labels: ``[N]`` integer targets.
        ignore_index: label value excluded from the loss and the count.
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size`.

    Returns:
        fp32 scalar: summed loss over counted tokens divided by their count (0.0 when none count).

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, or a non-positive chunk size.
    """
    check_loss_inputs("fused_linear_cross_entropy", hidden, weight, labels)
    if len({hidden.device, weight.device, labels.device}) != 1:
        raise ValueError("fused_linear_cross_entropy: hidden, weight and labels must be on one device")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if not use_triton(hidden, weight, labels):
        return reference.fused_linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size)
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, chunk_size)
