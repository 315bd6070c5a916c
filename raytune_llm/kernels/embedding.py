"""Row gather from a frozen embedding table that may live in pinned host memory: ``Y[n] = E[ids[n]]``.

Forward, for ``ids [..]`` (int) and a table ``E [V, H]``::

    Y[..., :] = E[ids[...], :]                  [..., H]   in E's dtype, on ids' device

Backward: none. The table is frozen (QLoRA trains adapters, not the input embeddings), so nothing flows
back to it, and the ids are integers. The op refuses a table that requires grad.

Why a kernel: a frozen input embedding is read 8 KiB a token per step (Llama-3.1-8B: 4096 bf16) and
otherwise only sits in GPU memory (128,256 x 4096 x 2 B = 0.98 GiB at 8B, 1.96 GiB at 70B). Kept in pinned
host memory instead, with CUDA's unified addressing a GPU kernel reads the rows it needs straight over PCIe
(zero-copy: no staging buffer, no host synchronisation, nothing the host must do per step, so it records into
a CUDA graph too). ``torch.embedding`` cannot mix a host table with device ids; this kernel takes the
table's address as the device sees it (Triton's launcher asks the driver for it).

An id outside ``[0, V)`` never reads outside the table: its row comes out NaN, so the loss turns NaN and the
trainer's non-finite check stops on it (``F.embedding`` would stop the process with a device-side assert).

Dtype policy: a copy; rows are stored exactly as read. Under the interpreter the kernel writes fp32 and
torch rounds (exact for bf16 and fp16 values; see `kernel_store_dtype`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raytune_llm.kernels import reference
from raytune_llm.kernels._dispatch import kernel_store_dtype, triton_next_power_of_2, use_triton

__all__ = ["embedding", "embedding_forward"]

# Columns per program: one 8 KiB Llama row (4096 bf16) per program at 4 warps, 16 B per thread per load. The reads
# cross PCIe, which sets the rate: on the H200 1024, 2048 and 4096 columns all gathered 8,192 rows of 4096 bf16 in
# 1.375-1.378 ms, 48.7-48.8 GB/s (bench/kernels/bench_embedding.py; embedding_gather_h200_20261129_s12g.json).
_BLOCK = 4096


@triton.jit
def _embedding_fwd_kernel(Y_ptr, E_ptr, Ids_ptr, stride_y, stride_e, n_rows, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    idx = tl.load(Ids_ptr + row).to(tl.int64)
    valid = (idx >= 0) & (idx < n_rows)
    safe = tl.where(valid, idx, 0)
    e = tl.load(E_ptr + safe * stride_e + cols, mask=mask & valid, other=float("nan"))
    tl.store(Y_ptr + row * stride_y + cols, e.to(Y_ptr.dtype.element_ty), mask=mask)


def embedding_forward(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Launch the gather: ``table[ids]`` on ``ids.device`` (the table on that device or in pinned host memory).

    Args:
        ids: integer token ids, any shape, contiguous or not.
        table: ``[V, H]`` with unit column stride.

    Returns:
        ``[*ids.shape, H]`` in ``table.dtype`` on ``ids.device``.
    """
    flat = ids.reshape(-1).contiguous()
    if table.stride(1) != 1:
        table = table.contiguous()
    n_cols = table.shape[1]
    out_dtype = kernel_store_dtype(table.dtype)
    Y = torch.empty(flat.numel(), n_cols, dtype=out_dtype, device=ids.device)
    if flat.numel():
        block = min(_BLOCK, triton_next_power_of_2(n_cols))
        grid = (flat.numel(), triton.cdiv(n_cols, block))
        _embedding_fwd_kernel[grid](
            Y, table, flat, Y.stride(0), table.stride(0), table.shape[0], n_cols, BLOCK=block, num_warps=4
        )
    return Y.to(table.dtype).view(*ids.shape, n_cols)


def _host_table(table: torch.Tensor, ids: torch.Tensor) -> bool:
    return not table.is_cuda and ids.is_cuda


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` for a frozen table, on the ids' device; the table may sit in pinned host memory.

    Triton path on CUDA ids (a host table must be pinned) or under ``TRITON_INTERPRET=1``; otherwise
    ``reference.embedding``.

    Args:
        ids: integer token ids ``[...]``.
        table: ``[V, H]`` embedding weight that does not require grad.

    Returns:
        ``[..., H]`` in ``table.dtype`` on ``ids.device``.

    Raises:
        ValueError: the table requires grad, is not 2-D, the ids are not integers, or a host table is not pinned or
            not row-major.
    """
    if table.requires_grad:
        raise ValueError("kernels.embedding gathers from a frozen table; this one requires grad")
    if table.dim() != 2:
        raise ValueError(f"kernels.embedding: the table must be [V, H], got shape {tuple(table.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"kernels.embedding: ids must be integers, got {ids.dtype}")
    if _host_table(table, ids) and not table.is_pinned():
        raise ValueError("kernels.embedding: a host table read by CUDA ids must be in pinned memory (pin_memory())")
    if _host_table(table, ids) and table.stride(1) != 1:
        raise ValueError(
            "kernels.embedding: a host table read by CUDA ids needs unit column stride (a copy is not pinned)"
        )
    if ids.is_cuda and table.is_cuda and ids.device != table.device:
        raise ValueError(f"kernels.embedding: ids on {ids.device}, table on {table.device}")
    if not use_triton(ids):
        return reference.embedding(ids, table)
    return embedding_forward(ids, table)
