"""The dimensions of a decoder-only model that memory depends on, read from its HF config.json.

`Shape.from_hf` is what the memory planner (`sharding.planner`) and its searches work from; LLAMA31_8B and
LLAMA31_70B are the config fields of the two models the anchors and benches use. Plain Python: no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3

# Shapes of the models the anchors and benches use (config.json fields the planner reads).
LLAMA31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA31_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


class PlanError(ValueError):
    """An input the planner cannot use (an unknown value, a model config it cannot read): one line."""


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder-only transformer that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> Shape:
        """Read a Shape from an HF config dict (a multimodal config's `text_config` is used when present).

        Raises:
            PlanError: on a missing field or a mixture-of-experts config.
        """
        if not isinstance(cfg, dict):
            raise PlanError(f"a model config must be a JSON object, got {type(cfg).__name__}")
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]
        if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise PlanError("mixture-of-experts configs are not supported by the planner (dense decoders only)")
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if k not in cfg
        ]
        if missing:
            raise PlanError(f"HF config lacks {', '.join(missing)}: pass the model's config.json")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each Linear of one decoder layer."""
        d, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }


# models/tiling.py's "auto" rule for mlp_chunk_tokens (sharding/ may not import models/; a test keeps the two
# equal): chunks of the tallest height (whole 64-row tiles) whose [chunk, intermediate] bf16 tensor fits in
# 1 GiB, and only for calls with more tokens than that, so the MLP's rows are min(tokens, chunk): monotonic.
_MLP_AUTO_BYTES = 1 << 30
_MLP_AUTO_ALIGN = 64
_ACT_BYTES = 2  # bf16 activations


def mlp_chunk_rows(
    intermediate: int, tokens: int, mlp_chunk_tokens: int | str | None, act_bytes: int = _ACT_BYTES
) -> int | None:
    """Tokens per MLP chunk the fused path uses (models/tiling.py's rule; ``act_bytes`` a compute-dtype element, 2:
    bf16), or None when it does not tile."""
    if not mlp_chunk_tokens or tokens <= 0:
        return None
    if mlp_chunk_tokens != "auto":
        return int(mlp_chunk_tokens)
    chunk = max(_MLP_AUTO_ALIGN, _MLP_AUTO_BYTES // (intermediate * act_bytes) // _MLP_AUTO_ALIGN * _MLP_AUTO_ALIGN)
    return chunk if tokens > chunk else None


def lora_param_count(shape: Shape, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable LoRA parameters: r * (in + out) per targeted Linear per layer."""
    proj = shape.projections()
    return shape.layers * sum(rank * (proj[t][0] + proj[t][1]) for t in targets)


def load_hf_config(path: str | os.PathLike) -> dict:
    """Read an HF config.json, given the file or the model folder.

    Raises:
        FileNotFoundError: when there is no config.json there.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config.json at {path}")
    return json.loads(path.read_text())
