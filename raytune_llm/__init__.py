"""raytune_llm: fused-kernel LoRA / QLoRA fine-tuning of open LLMs, from a laptop CPU to a Ray cluster.

The public API is imported lazily so `import raytune_llm` stays cheap (no torch, no CUDA probing):
the CLI's `validate` and `plan` commands run without importing torch at all.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "raytune_llm.models.load",
    "patch": "raytune_llm.models.patch",
    "unpatch": "raytune_llm.models.patch",
    "load_config": "raytune_llm.config",
    "RunConfig": "raytune_llm.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'raytune_llm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
