"""Choose between a Triton kernel and the plain-PyTorch reference.

Every public functional in ``raytune_llm.kernels`` calls :func:`use_triton` once and is the one
dispatch point: Triton runs on CUDA tensors, or anywhere when ``TRITON_INTERPRET=1`` is set (the
CPU test lane; the variable must be set before triton is imported, so it is read from the
environment, never written here). Anything else falls back to ``kernels.reference``.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "MAX_FUSED_SIZE",
    "fp32_out_gemms",
    "interpret_mode",
    "kernel_store_dtype",
    "row_block_settings",
    "side_stream",
    "triton_next_power_of_2",
    "use_triton",
]


def interpret_mode() -> bool:
    """Return True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``).

    Returns:
        Whether the environment asks Triton to interpret kernels on the CPU.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Return True when the Triton path should run for these tensors.

    Args:
        *tensors: the operation's tensor inputs; ``None`` entries are ignored.

    Returns:
        True if every given tensor is on a CUDA device, or if ``TRITON_INTERPRET=1`` is set;
        False otherwise (the caller then runs the reference). With no tensors, True only in
        interpret mode.
    """
    present = [t for t in tensors if t is not None]
    if interpret_mode():
        return True
    return bool(present) and all(t.is_cuda for t in present)


# One row per program, the whole row in registers: beyond 65536 elements (128 KiB of bf16) a row
# no longer fits the register file of one block even at 32 warps, so callers must loop over blocks.
MAX_FUSED_SIZE = 65536


def row_block_settings(n_cols: int) -> tuple[int, int]:
    """Block size and warp count for a kernel that handles one row of ``n_cols`` per program.

    The block is the next power of two of the row (Triton's ``tl.arange`` needs a power of two);
    warps grow with it so each thread keeps ~8-16 elements (a 128-bit vector of bf16 per load),
    the same steps as Liger-Kernel's ``calculate_settings``: 4096 -> 8 warps, 8192 -> 16.

    Args:
        n_cols: row width.

    Returns:
        ``(BLOCK, num_warps)``.

    Raises:
        ValueError: when the row is wider than ``MAX_FUSED_SIZE``.
    """
    block = triton_next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"row width {n_cols} exceeds the fused maximum {MAX_FUSED_SIZE}; loop over blocks instead")
    if block >= 32768:
        warps = 32
    elif block >= 8192:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps


def triton_next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``); ``triton.next_power_of_2`` without importing triton."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def kernel_store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel should write for an output of ``dtype``.

    Triton 3.6's CPU interpreter converts fp32 to bf16 by truncation, not round-to-nearest-even
    (measured: 4.05637 -> 4.03125, where the GPU and torch give 4.0625), which is up to one bf16 ulp
    off. Under the interpreter, launchers therefore let bf16 kernels write fp32 and round with torch
    afterwards; on the GPU the kernel stores bf16 directly (its ``.to(bf16)`` rounds to nearest even).

    Args:
        dtype: the output tensor's dtype.

    Returns:
        ``torch.float32`` for bf16 under ``TRITON_INTERPRET=1``, else ``dtype``.
    """
    return torch.float32 if dtype == torch.bfloat16 and interpret_mode() else dtype


# (purpose, device index) -> a side stream kept for the process: one per purpose, so copies of different kinds
# (offloaded checkpoints, a streamed head) queue separately.
_side_streams: dict[tuple[str, int], torch.cuda.Stream] = {}


def side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    """The process's side stream for ``purpose`` on CUDA ``device`` (made on first use)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (purpose, index)
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device=index)
    return _side_streams[key]


# [True] when torch's bf16 x bf16 -> fp32 GEMMs (`out_dtype`) ran here, [False] when not; empty until first tried.
_FP32_OUT_GEMM: list[bool] = []


def fp32_out_gemms(t: torch.Tensor) -> bool:
    """Whether one cuBLAS GEMM can take ``t``'s dtype in and write fp32 (torch's ``out_dtype``, CUDA only).

    Tried once per process on tiny operands of ``t``'s device and dtype; False on the CPU (torch has no such
    kernel there) and on a torch without it.
    """
    if not t.is_cuda:
        return False
    if not _FP32_OUT_GEMM:
        try:
            a = torch.zeros(16, 16, dtype=t.dtype, device=t.device)
            c = torch.mm(a, a, out_dtype=torch.float32)
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            _FP32_OUT_GEMM.append(True)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # a torch without bf16 -> fp32 GEMMs
            _FP32_OUT_GEMM.append(False)
    return _FP32_OUT_GEMM[0]
