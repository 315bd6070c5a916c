"""Llama family (Llama 2, 3, 3.1, 3.2, 3.3): the reference layout; full causal attention everywhere.

Llama's optional `attention_bias` / `mlp_bias` are handled generically by the patcher (a frozen base
bias is added after the fused LoRA projection), so nothing here depends on them.
"""

from __future__ import annotations

from raytune_llm.models.families import FamilySpec

SPEC = FamilySpec(name="llama", model_types=("llama",), qk_norm=False, sliding_window=lambda config, layer_idx: None)
