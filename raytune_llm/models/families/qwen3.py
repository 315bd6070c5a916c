"""Qwen3 family: Llama's layout plus an RMSNorm over head_dim on q and k, applied before RoPE.

The q/k norms are patched to `kernels.rms_norm` like the decoder norms (same Llama convention,
weight of size head_dim). Windows come from `config.layer_types` as in Qwen2.
"""

from __future__ import annotations

from raytune_llm.models.families import FamilySpec, window_from_layer_types

SPEC = FamilySpec(name="qwen3", model_types=("qwen3",), qk_norm=True, sliding_window=window_from_layer_types)
