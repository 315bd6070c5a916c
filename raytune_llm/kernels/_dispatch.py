"""Choose between a Triton kernel and the plain-PyTorch reference.

Every public functional in ``raytune_llm.kernels`` calls :func:`use_triton` once and is the one
dispatch point: Triton runs on CUDA tensors, or anywhere when ``TRITON_INTERPRET=1`` is set (the
CPU test lane; the variable must be set before triton is imported, so it is read from the
environment, never written here). Anything else falls back to ``kernels.reference``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["interpret_mode", "use_triton"]


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
