"""Mistral family: Llama's layout plus an optional sliding window shared by every layer.

Mistral 7B v0.1 used a 4096-token window; later releases set `sliding_window` to null. With a window
the fused attention masks keys further than `window - 1` positions back, as HF's sliding mask does.
"""

from __future__ import annotations

from typing import Any

from raytune_llm.models.families import FamilySpec


def _window(config: Any, layer_idx: int) -> int | None:
    del layer_idx
    return getattr(config, "sliding_window", None)


SPEC = FamilySpec(name="mistral", model_types=("mistral",), qk_norm=False, sliding_window=_window)
