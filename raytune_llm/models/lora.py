"""LoRA attachment in PEFT's own format, and reading a PEFT LoRA layer into the kernels' LoRAWeight.

Adapters are attached with `peft.get_peft_model`, so `save_pretrained` writes a standard adapter that
`PeftModel.from_pretrained` loads unchanged, with or without raytune_llm.

Dtype policy: PEFT keeps `lora_A` / `lora_B` in fp32 (`autocast_adapter_dtype=True`); we keep them so,
as fp32 master parameters for the optimizer (r=16 adapters of an 8B model are ~42M parameters, 168 MB).
The fused kernels cast A and B to the activation (compute) dtype, so the adapter math runs in bf16 on
tensor cores on the GPU, and gradients come back in fp32 to the fp32 parameters.

`lora_weight(module)` returns the LoRAWeight the kernels take, or a reason string when the layer must
stay on PEFT's stock forward: dropout > 0 (the kernels do not sample masks), a LoRA bias, DoRA, a
merged or disabled adapter, several active adapters, a base weight that is neither a plain Linear
nor a bitsandbytes NF4 Linear4bit, or DeepSpeed ZeRO-3 partitioned weights (ZeRO-3 gathers a module's
parameters in that module's pre-forward hook, which the fused path does not call).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from raytune_llm.models.lora_spec import DEFAULT_TARGETS, LoraSpec, check_targets  # noqa: F401 - re-exported


def module_leaf_names(model_path: str | os.PathLike, trust_remote_code: bool = False) -> set[str]:
    """The last name component of every module of a local HF model, from its config alone (meta device, no weights).

    Lets a driver check `lora.target_modules` in a second before any worker loads weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}


def attach_lora(model: torch.nn.Module, spec: LoraSpec) -> Any:
    """Wrap a causal LM in a PEFT LoRA model.

    Args:
        model: a transformers causal LM (bf16/fp32 or bitsandbytes 4-bit).
        spec: the LoRA hyper-parameters.

    Returns:
        A `peft.PeftModelForCausalLM` with only the adapters trainable.

    Raises:
        ValueError: no module of the model matches `spec.target_modules`.
    """
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    check_targets(spec, names)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=[t for t in spec.target_modules if t in names],
        use_rslora=spec.use_rslora,
        bias=spec.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class _InterimLoRAWeight(NamedTuple):
    """Same fields as `kernels.lora.LoRAWeight` (docs/INTERFACES.md); used only while that file is absent,
    so the references in `kernels.reference` (which read the fields by name) can run the fused path."""

    base: Any
    A: torch.Tensor
    B: torch.Tensor
    scaling: float


def _lora_weight_type() -> type:
    try:
        from raytune_llm.kernels.lora import LoRAWeight
    except ImportError:
        return _InterimLoRAWeight
    return LoRAWeight


def zero3_partitioned(t: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 has partitioned: it holds only a shard until a module
    pre-forward hook gathers it, and the fused path reads weights without calling those modules."""
    return hasattr(t, "ds_id")


def _base_weight(base: torch.nn.Module) -> tuple[Any, str | None]:
    """The kernels' view of a frozen base Linear: a dense tensor or an NF4Weight."""
    weight = getattr(base, "weight", None)
    if weight is None:
        return None, f"base layer {type(base).__name__} has no weight"
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        if getattr(quant_state, "packing_format_for_cpu", False):
            return None, "bitsandbytes repacked this weight for CPU inference (eval, no grad)"
        if getattr(quant_state, "quant_type", None) != "nf4":
            return None, f"4-bit base of type {getattr(quant_state, 'quant_type', '?')!r}, only nf4 is fused"
        try:
            from raytune_llm.kernels.nf4 import NF4Weight
        except ImportError:
            return None, "kernels.nf4 is not available"
        return NF4Weight.from_bnb(weight), None
    if type(base) is not torch.nn.Linear:
        return None, f"base layer {type(base).__name__} is not a plain Linear or an NF4 Linear4bit"
    return weight.detach(), None  # the storage of now: backward reads what forward did (models.host_weights)


def base_weight(base: torch.nn.Module) -> Any:
    """`_base_weight`'s weight alone, read from the module now (a lazy `LoRAWeight.base`: `models.host_weights`)."""
    return _base_weight(base)[0]


def lora_weight(module: torch.nn.Module) -> tuple[Any, torch.Tensor | None, str | None]:
    """Read a PEFT LoRA Linear into the kernels' LoRAWeight.

    Args:
        module: a projection (PEFT `lora.Linear`, possibly over a bnb `Linear4bit`).

    Returns:
        `(LoRAWeight, base_bias, None)` when the layer can run fused (base_bias is the frozen base
        Linear's bias or None), else `(None, None, reason)`.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return None, None, "peft is not installed"
    if not isinstance(module, LoraLayer):
        return None, None, "not a LoRA layer"
    if module.merged:
        return None, None, "adapter is merged into the base weight"
    if module.disable_adapters:
        return None, None, "adapters are disabled"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None, None, f"{len(active)} active adapters (fused path takes exactly one)"
    name = active[0]
    dropout = module.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        return None, None, f"lora dropout {dropout.p} > 0"
    if module.use_dora.get(name, False):
        return None, None, "DoRA"
    if getattr(module, "lora_bias", {}).get(name, False) or module.lora_B[name].bias is not None:
        return None, None, "LoRA bias"
    base = module.get_base_layer()
    if getattr(base, "bias", None) is not None and base.bias.requires_grad:
        return None, None, "trainable base bias (lora bias mode 'all' / 'lora_only')"
    base_w, reason = _base_weight(base)
    if reason is not None:
        return None, None, reason
    if any(zero3_partitioned(t) for t in (base.weight, module.lora_A[name].weight, module.lora_B[name].weight)):
        return None, None, "DeepSpeed ZeRO-3 partitioned weights (gathered only by the stock module call)"
    w = _lora_weight_type()(
        base=base_w, A=module.lora_A[name].weight, B=module.lora_B[name].weight, scaling=float(module.scaling[name])
    )
    return w, getattr(base, "bias", None), None
