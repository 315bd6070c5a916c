"""Tiny random-weight models of the supported families, written to a local folder.

Tests, the quickstart and the demo need a real transformers architecture without any download:
`build_tiny_model` builds the family's config, instantiates the causal LM with seeded random weights
and `save_pretrained`s it (config.json + model.safetensors), so `from_pretrained(path)` loads it like
any checkpoint. Weights are drawn with the model's own `_init_weights` under a fixed torch seed,
so the same arguments always give the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(
    family: str = "llama",
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    rms_norm_eps: float = 1e-6,
    initializer_range: float = 0.02,
):
    """Build the transformers config of a tiny model of one family.

    Args:
        family: one of "llama", "mistral", "qwen2", "qwen3".
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, max_position_embeddings, tie_word_embeddings, rms_norm_eps: the usual
            HF config fields.

    Returns:
        A `transformers.PretrainedConfig` of the family (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config).

    Raises:
        ValueError: unknown family, or heads that do not divide the hidden size / each other.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {', '.join(FAMILIES)}")
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} is not divisible by num_key_value_heads={num_key_value_heads}"
        )
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=rms_norm_eps,
        # 0.02 is right for 4096-wide models; a 128-wide model learns far faster from ~1/sqrt(hidden)
        # (quickstart: exact match 0.25 -> 0.84 after 300 steps when raised from 0.02 to 0.1).
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen3":
        # Qwen3 sets head_dim explicitly (128 in the real models); keep it hidden/heads here.
        kwargs["head_dim"] = hidden_size // num_attention_heads
    if family in ("mistral", "qwen2", "qwen3"):
        # No sliding window: the tiny model is meant to match full causal attention everywhere.
        kwargs["sliding_window"] = None
    return cls(**kwargs)


def build_tiny_model(
    path: str | os.PathLike,
    family: str = "llama",
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    dtype: Any = None,
    max_shard_size: str | None = None,
) -> Path:
    """Write a tiny random-weight causal LM of one family to `path` (config.json + safetensors).

    Args:
        path: target folder (created if missing).
        family: one of "llama", "mistral", "qwen2", "qwen3".
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, max_position_embeddings, tie_word_embeddings: the HF config fields.
        seed: torch seed for the weights; same arguments give the same weights.
        dtype: dtype of the saved weights (a torch dtype; default float32).
        max_shard_size: split the safetensors into shards of at most this size (e.g. "8MB"), with an index.

    Returns:
        The folder as a Path, ready for `from_pretrained` / `raytune_llm.load_model`.

    Raises:
        ValueError: unknown family or inconsistent head counts.
    """
    import torch
    import transformers

    config = tiny_config(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    devnull_rng = torch.random.fork_rng(devices=[])  # leave the caller's RNG stream untouched
    with devnull_rng:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Norm weights init to exactly 1; perturb them so tests notice a norm that is skipped or misapplied.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out
