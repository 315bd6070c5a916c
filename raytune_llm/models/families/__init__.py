"""Per-family adapters: what differs between Llama, Mistral, Qwen2 and Qwen3 for the fused path.

The four families share one decoder layout (pre-norm RMSNorm, GQA attention with RoPE, SwiGLU MLP,
untied or tied LM head). A `FamilySpec` records only the differences the patcher needs: whether the
attention normalises q and k per head (Qwen3) and which layers use a sliding window. `family_of`
maps a model to its spec by `config.model_type`; an unknown type returns None and the model trains
on stock modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FamilySpec:
    """What the patcher needs to know about one model family.

    Attributes:
        name: family name ("llama", ...).
        model_types: the `config.model_type` values this spec covers.
        qk_norm: the attention applies an RMSNorm over head_dim to q and k before RoPE (Qwen3).
        sliding_window: `(config, layer_idx) -> window or None`; the number of keys a query sees
            (itself included), None for full causal attention.
    """

    name: str
    model_types: tuple[str, ...]
    qk_norm: bool
    sliding_window: Callable[[Any, int], int | None]


def window_from_layer_types(config: Any, layer_idx: int) -> int | None:
    """Sliding window of one layer for configs that list `layer_types` (Qwen2/Qwen3, transformers >= 4.53).

    Args:
        config: the HF config.
        layer_idx: decoder layer index.

    Returns:
        `config.sliding_window` when that layer is a "sliding_attention" layer, else None.
    """
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer_idx] == "sliding_attention":
        return getattr(config, "sliding_window", None)
    return None


def family_of(model_or_config: Any) -> FamilySpec | None:
    """The family spec of a transformers model or config.

    Args:
        model_or_config: a PreTrainedModel (or PEFT wrapper exposing `.config`) or a PretrainedConfig.

    Returns:
        The matching FamilySpec, or None for an architecture we do not patch.
    """
    from raytune_llm.models.families import llama, mistral, qwen2, qwen3

    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in (llama.SPEC, mistral.SPEC, qwen2.SPEC, qwen3.SPEC):
        if model_type in spec.model_types:
            return spec
    return None
