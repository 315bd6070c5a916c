"""LoRA hyper-parameters and the check of target module names: no torch, so the CLI's `validate` checks a config's
LoRA targets without importing it (models.lora re-exports all of this)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHORT = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


@dataclass
class LoraSpec:
    """LoRA hyper-parameters.

    Attributes:
        r: rank (> 0).
        alpha: scaling numerator; the update is `B @ A * alpha / r` (or `/ sqrt(r)` with rsLoRA).
        dropout: dropout on the adapter input; > 0 keeps that layer on PEFT's stock (slower) path.
        target_modules: module names to adapt; short names q,k,v,o,gate,up,down are accepted.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        bias: PEFT's bias mode ("none", "lora_only", "all"); anything but "none" takes the stock path.
    """

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)
    use_rslora: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora.r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in ("none", "lora_only", "all"):
            raise ValueError(f"lora.bias must be 'none', 'lora_only' or 'all', got {self.bias!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: name at least one module, e.g. q_proj")
        self.target_modules = tuple(_SHORT.get(t, t) for t in self.target_modules)

    @classmethod
    def coerce(cls, value: LoraSpec | dict | None) -> LoraSpec | None:
        """Accept a LoraSpec, a plain dict of its fields, or None.

        Raises:
            ValueError: unknown keys in the dict, or a bad value.
        """
        if value is None or isinstance(value, LoraSpec):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"lora must be a LoraSpec, a dict or None, got {type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown lora key(s) {unknown}: expected some of {sorted(known)}")
        return cls(**value)


def check_targets(spec: LoraSpec, names: set[str]) -> None:
    """Raise ValueError when no name of `spec.target_modules` is a module of the model (the rule of `attach_lora`).

    Args:
        spec: the LoRA spec.
        names: module leaf names, e.g. from `module_leaf_names`.
    """
    if not any(t in names for t in spec.target_modules):
        linear = sorted(n for n in names if n.endswith("proj") or n in ("c_attn", "c_proj", "c_fc", "fc1", "fc2"))
        raise ValueError(
            f"lora.target_modules {list(spec.target_modules)} match no module of this model"
            + (f" (its projections: {', '.join(linear)})" if linear else "")
        )
