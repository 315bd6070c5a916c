"""Qwen2 / Qwen2.5 family: Llama's layout with a bias on q, k and v (not on o).

The q/k/v bias is frozen base weight: the patcher adds it after the fused LoRA QKV projection. A
sliding window applies only to layers listed as "sliding_attention" in `config.layer_types`
(off in the released models: `use_sliding_window=false`).
"""

from __future__ import annotations

from raytune_llm.models.families import FamilySpec, window_from_layer_types

SPEC = FamilySpec(name="qwen2", model_types=("qwen2",), qk_norm=False, sliding_window=window_from_layer_types)
