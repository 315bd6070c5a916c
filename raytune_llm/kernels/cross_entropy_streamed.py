"""Fused LM-head projection + cross-entropy with the head in pinned host memory, streamed in over PCIe.

The LM head of a QLoRA run is frozen and takes vocab x hidden of GPU memory in bf16 (0.98 GiB at
Llama-3.1-8B) for the whole step, though only the loss reads it. Here it stays in pinned host memory and
comes in a chunk of ``Vc`` vocabulary rows at a time on a side stream, double-buffered, while the loss
works on the chunk before. Every chunk is read once, so the softmax runs online over the vocabulary (as
flash attention runs it over keys), for hidden states ``h [N, H]``, head ``W [V, H]``, labels ``y``::

    S_j   = h @ W_j^T                             # the chunk's logits [N, Vc] (bf16, fp32 inside the GEMM)
    m     = running reference per row             # the first chunk's row max; moved up (and l, l', acc
                                                  # rescaled) only when a later chunk's max passes it by > 20
    E_j   = exp(S_j - m)                          # fp32 (at most e^20)
    P_j   = E_j without the label's column        # stored over S_j in bf16
    l    += sum_v E_j,   l' += sum_v P_j          # fp32; l' = l - E_y
    acc  += P_j @ W_j                             # fp32 [N, H], fp32 inside the GEMM
    z_y   = S_j[y - j0], Wy = W_j[y - j0]         # in the chunk that holds the label

    loss_i = m_i + log(l_i) - z_y                 # counted rows; mean over them (n = max(count, 1))
    dL/dh  = (acc - l' Wy) / l / n                # = (softmax - onehot) @ W / n, rounded once to h's dtype

The label's column stays out of the GEMM so that its gradient, ``p_y - 1 = -l' / l``, is formed in fp32: a
confident token's ``acc / l - Wy`` would be a difference of near-equal terms, each rounded through the bf16
``P``. ``Wy`` is written into the ``dL/dh`` buffer itself until the last kernel reads it, so the extra device
memory is two head chunks, one ``[N, Vc]`` logits chunk and the fp32 accumulator ``[N, H]`` (at 8,192 tokens of
an 8B model, 4096-row chunks: 64 + 64 + 128 MiB, against the head's 1,002 MiB; by size). Moving the reference
lazily keeps the accumulator from being rescaled in full each chunk; a row whose max rises by more than 20 nats
over its reference has its accumulator row rescaled inside the row kernel.

Against `kernels.cross_entropy` (head on the device): the same two GEMMs over the vocabulary, plus the
accumulator's read and write in each chunk's GEMM, plus the head's 1 GB over PCIe each call (0.61 ms per 32 MiB
chunk at the H200's 55 GB/s; the first chunk's copy is not hidden). A chunk's two GEMMs (4 x N x 4096 x 4096 FLOP)
outlast its copy from roughly 6,000-9,000 tokens (by the matmul rate); below that the loss waits on PCIe: about 19
ms at 2,048 tokens against ~6 ms of GEMMs, so a short step is better served by the head on the device. Measured on
the H200 at 4x2048 (a CUDA-graph step, session 14): 587.6 -> 586.8 ms a step, 0.92 GiB lower peak. The loss is the
same up to fp32 rounding order; ``dL/dh`` within a bf16 rounding of the device path's.

Frozen heads only (``dL/dW`` is not made); the backward scales ``dL/dh`` by the upstream scalar, as
`kernels.cross_entropy` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raytune_llm.kernels import reference
from raytune_llm.kernels._dispatch import (
    MAX_FUSED_SIZE,
    fp32_out_gemms,
    kernel_store_dtype,
    row_block_settings,
    side_stream,
    triton_next_power_of_2,
    use_triton,
)
from raytune_llm.kernels.cross_entropy import _scale_unless_one, check_loss_inputs

__all__ = ["StreamedLinearCrossEntropyFunction", "streamed_linear_cross_entropy", "streamed_cross_entropy_forward"]

# Head rows per chunk: 32 MiB of an 8B head in bf16, one row-kernel block of 4096 fp32 values over 8 warps.
VOCAB_CHUNK = 4096
# A later chunk's row max may pass the running reference by this many nats before the row is rescaled:
# exp(20) = 4.9e8 stays well inside bf16's and fp32's range, summed over a 128K vocabulary too.
_RESCALE_NATS = 20.0
_BLOCK_H = 1024


@triton.jit
def _stream_row_kernel(
    S_ptr,
    stride_s,
    n_cols,
    LABELS_ptr,
    M_ptr,
    L_ptr,
    LR_ptr,
    ZT_ptr,
    ACC_ptr,
    stride_acc,
    W_ptr,
    stride_w,
    WY_ptr,
    stride_wy,
    H,
    v0,
    ignore_index,
    FIRST: tl.constexpr,
    HAS_ACC: tl.constexpr,
    RESCALE_NATS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    s = tl.load(S_ptr + row * stride_s + offs, mask=mask, other=float("-inf")).to(tl.float32)
    label = tl.load(LABELS_ptr + row).to(tl.int64)
    local = label - v0
    counted = label != ignore_index
    here = counted & (local >= 0) & (local < n_cols)
    cmax = tl.max(s, axis=0)
    if FIRST:
        m = cmax
        l_sum = 0.0
        l_rest = 0.0
    else:
        m = tl.load(M_ptr + row)
        l_sum = tl.load(L_ptr + row)
        l_rest = tl.load(LR_ptr + row)
        if cmax > m + RESCALE_NATS:
            r = tl.exp(m - cmax)
            l_sum = l_sum * r
            l_rest = l_rest * r
            if HAS_ACC:
                h0 = 0
                while h0 < H:  # a while loop: the interpreter cannot range() over a runtime bound
                    hs = h0 + tl.arange(0, BLOCK_H)
                    hm = hs < H
                    a = tl.load(ACC_ptr + row * stride_acc + hs, mask=hm, other=0.0)
                    tl.store(ACC_ptr + row * stride_acc + hs, a * r, mask=hm)
                    h0 += BLOCK_H
            m = cmax
    e = tl.where(mask, tl.exp(s - m), 0.0)
    # The label's own column stays out of P (and so out of acc): its gradient, p_y - 1 = -(sum of the others) / l,
    # is formed in fp32 at the end from l_rest, not as acc / l - W_y, a difference of near-equal terms on a
    # confident token.
    p = tl.where((offs == local) & here, 0.0, e)
    l_sum += tl.sum(e, axis=0)
    l_rest += tl.sum(p, axis=0)
    tl.store(S_ptr + row * stride_s + offs, p.to(S_ptr.dtype.element_ty), mask=mask)
    tl.store(M_ptr + row, m)
    tl.store(L_ptr + row, l_sum)
    tl.store(LR_ptr + row, l_rest)
    if here:
        tl.store(ZT_ptr + row, tl.sum(tl.where(offs == local, s, 0.0), axis=0))
        if HAS_ACC:
            h0 = 0
            while h0 < H:
                hs = h0 + tl.arange(0, BLOCK_H)
                hm = hs < H
                w = tl.load(W_ptr + local * stride_w + hs, mask=hm, other=0.0)
                tl.store(WY_ptr + row * stride_wy + hs, w, mask=hm)
                h0 += BLOCK_H


@triton.jit
def _stream_final_kernel(
    ACC_ptr,
    stride_acc,
    WY_ptr,
    stride_wy,
    DH_ptr,
    stride_dh,
    M_ptr,
    L_ptr,
    LR_ptr,
    ZT_ptr,
    LABELS_ptr,
    LOSS_ptr,
    DENOM_ptr,
    H,
    ignore_index,
    HAS_ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    valid = tl.load(LABELS_ptr + row) != ignore_index
    m = tl.load(M_ptr + row)
    l_sum = tl.load(L_ptr + row)
    zt = tl.load(ZT_ptr + row)
    tl.store(LOSS_ptr + row, tl.where(valid, m + tl.log(l_sum) - zt, 0.0))
    if HAS_ACC:
        inv_l = 1.0 / l_sum
        w_y = tl.load(LR_ptr + row) * inv_l  # 1 - p_y, in fp32
        # A counted label outside [0, V) found no column: NaN, as its loss (W_y was never written).
        scale = tl.where(valid, tl.where(zt == zt, 1.0, float("nan")), 0.0) / tl.load(DENOM_ptr)
        h0 = 0
        while h0 < H:
            hs = h0 + tl.arange(0, BLOCK_H)
            hm = hs < H
            a = tl.load(ACC_ptr + row * stride_acc + hs, mask=hm, other=0.0)
            wy = tl.load(WY_ptr + row * stride_wy + hs, mask=hm & valid, other=0.0).to(tl.float32)
            g = tl.where(valid, (a * inv_l - w_y * wy) * scale, 0.0)
            tl.store(DH_ptr + row * stride_dh + hs, g.to(DH_ptr.dtype.element_ty), mask=hm)
            h0 += BLOCK_H


def _accumulate(acc: torch.Tensor, p: torch.Tensor, w: torch.Tensor, first: bool) -> None:
    """``acc (=|+=) p @ w``: one GEMM writing fp32 on CUDA (torch's ``out_dtype``), else a product added in fp32."""
    if fp32_out_gemms(p):
        if first:
            torch.mm(p, w, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, p, w, out_dtype=torch.float32, out=acc)
        return
    # The CPU (interpreter) in fp32; a CUDA torch without those GEMMs in the input dtype, one rounding per chunk.
    prod = torch.mm(p, w) if p.is_cuda else torch.mm(p.float(), w.float())
    if first:
        acc.copy_(prod)
    else:
        acc.add_(prod)


class _Chunks:
    """The head's vocabulary chunks on the compute device: copied over on a side stream into two buffers in turn
    (CUDA and a host head), else sliced (a head already on the compute device, or a CPU run)."""

    def __init__(self, weight: torch.Tensor, device: torch.device, rows: int) -> None:
        self.weight = weight
        self.bounds = [(v0, min(v0 + rows, weight.shape[0])) for v0 in range(0, weight.shape[0], rows)]
        self.streamed = device.type == "cuda" and weight.device.type == "cpu"
        if not self.streamed:  # the head is on the compute device already (checked by the caller), or a CPU run
            return
        n_bufs = min(2, len(self.bounds))
        h = weight.shape[1]
        rows = min(rows, weight.shape[0])
        # Allocated on the compute stream that reads them; the side stream writes each only after the compute
        # stream is done with its previous chunk (`free`), and the compute stream waits for each copy (`ready`),
        # so no copy is still running when the buffers are freed.
        self.bufs = [torch.empty(rows, h, dtype=weight.dtype, device=device) for _ in range(n_bufs)]
        self.ready = [torch.cuda.Event() for _ in range(n_bufs)]
        self.free = [torch.cuda.Event() for _ in range(n_bufs)]
        self.compute = torch.cuda.current_stream(device)
        self.stream = side_stream(device, "head")
        self.stream.wait_stream(self.compute)
        for j in range(n_bufs):
            self._issue(j, wait_free=False)

    def _issue(self, j: int, wait_free: bool) -> None:
        b = j % len(self.bufs)
        v0, v1 = self.bounds[j]
        with torch.cuda.stream(self.stream):
            if wait_free:
                self.stream.wait_event(self.free[b])
            self.bufs[b][: v1 - v0].copy_(self.weight[v0:v1], non_blocking=True)
            self.ready[b].record(self.stream)

    def get(self, j: int) -> torch.Tensor:
        v0, v1 = self.bounds[j]
        if not self.streamed:
            return self.weight[v0:v1]
        b = j % len(self.bufs)
        self.compute.wait_event(self.ready[b])
        return self.bufs[b][: v1 - v0]

    def join(self) -> None:
        """The compute stream waits for every copy issued (after an error part-way, so none still writes a buffer
        that is freed, and a capture's side stream is joined back)."""
        if self.streamed:
            for event in self.ready:
                self.compute.wait_event(event)

    def done(self, j: int) -> None:
        """The compute stream has queued everything that reads chunk ``j``: its buffer may take chunk ``j + 2``."""
        if self.streamed and j + len(self.bufs) < len(self.bounds):
            b = j % len(self.bufs)
            self.free[b].record(self.compute)
            self._issue(j + len(self.bufs), wait_free=True)


def streamed_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    need_dh: bool,
    vocab_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss and, when asked, ``dL/dh``, over the head's vocabulary chunks.

    Args:
        hidden: ``[N, H]`` on the compute device.
        weight: ``[V, H]`` frozen head, in pinned host memory (streamed) or on the compute device (sliced).
        labels: ``[N]`` integer ids on the compute device.
        ignore_index: label that takes no part.
        need_dh: compute ``dL/dh``.
        vocab_chunk: head rows per chunk (None: `VOCAB_CHUNK`).

    Returns:
        ``(loss fp32 scalar, dL/dh [N, H] or None)`` for an upstream gradient of 1.
    """
    N, H = hidden.shape
    device = hidden.device
    labels = labels.contiguous()
    denom = (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
    loss_rows = torch.empty(N, dtype=torch.float32, device=device)
    if N == 0:
        return loss_rows.sum() / denom, (torch.empty_like(hidden) if need_dh else None)
    m = torch.empty(N, dtype=torch.float32, device=device)
    l_sum = torch.empty(N, dtype=torch.float32, device=device)
    l_rest = torch.empty(N, dtype=torch.float32, device=device)
    zt = torch.full((N,), float("nan"), dtype=torch.float32, device=device)  # a label outside [0, V): NaN loss
    acc = torch.empty(N, H, dtype=torch.float32, device=device) if need_dh else None
    # Holds W[y] until the last kernel writes dL/dh over it (fp32 under the interpreter: see kernel_store_dtype).
    grad_h = torch.empty(N, H, dtype=kernel_store_dtype(hidden.dtype), device=device) if need_dh else None
    rows = vocab_chunk or VOCAB_CHUNK
    BLOCK, num_warps = row_block_settings(min(rows, weight.shape[0]))
    block_h = min(_BLOCK_H, triton_next_power_of_2(H))
    dummy = hidden.new_empty(1)
    chunks = _Chunks(weight, device, rows)
    try:
        _over_chunks(hidden, labels, ignore_index, need_dh, chunks, m, l_sum, l_rest, zt, acc, grad_h, BLOCK, num_warps,
                     block_h, dummy)  # fmt: skip
    finally:
        chunks.join()
    _stream_final_kernel[(N,)](
        acc if need_dh else dummy,
        acc.stride(0) if need_dh else 0,
        grad_h if need_dh else dummy,
        grad_h.stride(0) if need_dh else 0,
        grad_h if need_dh else dummy,
        grad_h.stride(0) if need_dh else 0,
        m,
        l_sum,
        l_rest,
        zt,
        labels,
        loss_rows,
        denom,
        H,
        ignore_index,
        HAS_ACC=need_dh,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return loss_rows.sum() / denom, (grad_h.to(hidden.dtype) if need_dh else None)


def _over_chunks(hidden, labels, ignore_index, need_dh, chunks, m, l_sum, l_rest, zt, acc, grad_h, BLOCK, num_warps,
                 block_h, dummy) -> None:  # fmt: skip
    H = hidden.shape[1]
    N = hidden.shape[0]
    for j, (v0, _) in enumerate(chunks.bounds):
        wc = chunks.get(j)
        # Under the interpreter bf16 round-trips through fp32 (see kernel_store_dtype); a no-op on GPU.
        s = (hidden @ wc.t()).to(kernel_store_dtype(hidden.dtype))
        _stream_row_kernel[(N,)](
            s,
            s.stride(0),
            s.shape[1],
            labels,
            m,
            l_sum,
            l_rest,
            zt,
            acc if need_dh else dummy,
            acc.stride(0) if need_dh else 0,
            wc,
            wc.stride(0),
            grad_h if need_dh else dummy,
            grad_h.stride(0) if need_dh else 0,
            H,
            v0,
            ignore_index,
            FIRST=j == 0,
            HAS_ACC=need_dh,
            RESCALE_NATS=_RESCALE_NATS,
            BLOCK=BLOCK,
            BLOCK_H=block_h,
            num_warps=num_warps,
        )
        if need_dh:
            _accumulate(acc, s.to(hidden.dtype), wc, first=j == 0)
        del s
        chunks.done(j)


class StreamedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: ``dL/dh`` is made in the forward; the backward scales it by the upstream scalar (once)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, vocab_chunk: int | None):
        loss, grad_h = streamed_cross_entropy_forward(
            hidden, weight, labels, ignore_index, ctx.needs_input_grad[0], vocab_chunk
        )
        ctx.grad_h = grad_h
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grad_h is None and ctx.needs_input_grad[0]:
            raise RuntimeError(
                "streamed_linear_cross_entropy: backward can run once per forward (the gradient is made in the forward)"
            )
        grad_h, ctx.grad_h = ctx.grad_h, None
        if grad_h is not None:
            _scale_unless_one(grad_h, grad_output.detach().to(torch.float32))
        return grad_h, None, None, None, None


def streamed_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, the frozen head read chunk by chunk.

    The head may sit in pinned host memory while ``hidden`` is on a GPU (then its chunks come over on a side
    stream), or on ``hidden``'s device. Runs the Triton kernels on CUDA or under ``TRITON_INTERPRET=1``, otherwise
    ``reference.fused_linear_cross_entropy``.
    The caller shifts labels.

    Args:
        hidden: ``[N, H]`` final hidden states.
        weight: ``[V, H]`` frozen LM head weight, same dtype as ``hidden``.
        labels: ``[N]`` integer targets on ``hidden``'s device.
        ignore_index: label value excluded from the loss and the count.
        vocab_chunk: head rows per chunk (None: `VOCAB_CHUNK`).

    Returns:
        fp32 scalar: summed loss over counted tokens divided by their count (0.0 when none count).

    Raises:
        ValueError: mismatched shapes, dtypes or devices, a trainable head, a head on another GPU, or a
            non-positive chunk.
    """
    check_loss_inputs("streamed_linear_cross_entropy", hidden, weight, labels)
    if weight.requires_grad:
        raise ValueError("streamed_linear_cross_entropy: the head must be frozen (no weight gradient is made)")
    if labels.device != hidden.device or (weight.device != hidden.device and weight.device.type != "cpu"):
        raise ValueError("streamed_linear_cross_entropy: labels on hidden's device; weight there or on the host")
    if vocab_chunk is not None and not 1 <= vocab_chunk <= MAX_FUSED_SIZE:
        raise ValueError(
            f"streamed_linear_cross_entropy: vocab_chunk must be in [1, {MAX_FUSED_SIZE}], got {vocab_chunk}"
        )
    if weight.shape[0] < 1:
        raise ValueError("streamed_linear_cross_entropy: the head has no rows (vocabulary of 0)")
    if hidden.is_cuda and weight.device.type == "cpu" and not weight.is_pinned():
        raise ValueError(
            "streamed_linear_cross_entropy: a host head must be in pinned memory (weight.pin_memory()): "
            "pageable copies are synchronous and cannot be recorded in a CUDA graph"
        )
    if weight.stride(1) != 1:
        raise ValueError("streamed_linear_cross_entropy: the head needs unit column stride (.contiguous())")
    if not use_triton(hidden, labels):  # a CPU run without the interpreter: the head is on the host already
        return reference.fused_linear_cross_entropy(hidden, weight, labels, ignore_index, None)
    return StreamedLinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, vocab_chunk)
