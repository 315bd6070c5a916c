"""Random-weight models of any supported config, built on the target device without a checkpoint.

The GPU benchmarks need 8B- and 70B-shaped models with no weights on disk and without ever holding the
bf16 model whole (70B in bf16 is 140 GB, over one H200). `build_synthetic_model` creates the module tree
on the meta device, then materialises it one module at a time on the target device: each decoder Linear
is drawn dense (normal, std = `initializer_range`, from a seeded generator on the device) and
immediately quantized to bitsandbytes NF4 when `quantize="nf4"`, so peak memory is the quantized model
plus one dense Linear. Embeddings, norms and the LM head stay dense as in a bitsandbytes-loaded model.
LoRA is attached with PEFT and the fused kernels patched in, exactly as `load_model` does.
"""

from __future__ import annotations

from typing import Any

import torch

from raytune_llm.models.checkpointing import check_mode
from raytune_llm.models.lora import LoraSpec, attach_lora
from raytune_llm.models.patch import patch
from raytune_llm.models.quantize import check_quantize, keep_nf4_layout, quantize_weight


def _materialise(
    model: torch.nn.Module, config: Any, quantize: str | None, dtype, device, gen, quant_storage, double_quant
) -> None:
    std = float(getattr(config, "initializer_range", 0.02))
    inner = model.model
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb") or not any(True for _ in module.parameters(recurse=False)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, torch.nn.Linear):
            weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device)
            weight.normal_(0.0, std, generator=gen)
            bias = None if module.bias is None else torch.zeros(module.out_features, dtype=dtype, device=device)
            if quantize == "nf4" and name.startswith("model.layers."):
                setattr(parent, child, quantize_weight(weight, bias, dtype, device, quant_storage, double_quant))
                del weight  # only one dense Linear alive at a time
                continue
            module.to_empty(device=device, recurse=False)
            with torch.no_grad():
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.zero_()
        elif isinstance(module, torch.nn.Embedding):
            module.to_empty(device=device, recurse=False)
            with torch.no_grad():
                module.weight.normal_(0.0, std, generator=gen)
        else:  # RMSNorms: weight 1, like a fresh HF init
            module.to_empty(device=device, recurse=False)
            with torch.no_grad():
                for p in module.parameters(recurse=False):
                    p.fill_(1.0)
    # inv_freq is a computed, non-persistent buffer: rebuild the rotary embedding on the device.
    with torch.device(device):
        inner.rotary_emb = type(inner.rotary_emb)(config=config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()


def build_synthetic_model(
    hf_config_dict: dict,
    quantize: str | None = "nf4",
    lora: LoraSpec | dict | None = None,
    gradient_checkpointing: str = "off",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    seed: int = 0,
    fused: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    double_quant: bool = True,
) -> Any:
    """Build a random-weight causal LM from an HF config dict, quantized as it is built, with LoRA.

    Args:
        hf_config_dict: an HF config as a dict; must carry `model_type` (e.g. "llama"); any field of
            that config class may be given (hidden_size, intermediate_size, num_hidden_layers,
            num_attention_heads, num_key_value_heads, vocab_size, rope_parameters, ...).
        quantize: "nf4" (decoder Linears to bitsandbytes NF4, double quant) or None.
        lora: LoraSpec or dict; default r=16, alpha=16 on all linear projections.
        gradient_checkpointing: "off", "on" or "offload".
        dtype: dtype of dense weights and of the compute.
        device: target device (default: current CUDA device, else CPU).
        seed: seed of the weight generator (on the device; the same seed gives the same weights on
            the same device type).
        fused: patch the fused kernels in (False: plain transformers + PEFT with HF checkpointing).
        quant_storage: packed 4-bit storage dtype (bf16 under DeepSpeed ZeRO-3), as in `load_model`.
        double_quant: with "nf4", quantize the block scales too.

    Returns:
        A `peft.PeftModelForCausalLM` in train mode; the PatchReport at `.raytune_patch_report`.

    Raises:
        ValueError: no `model_type`, or a bad quantize / gradient_checkpointing / lora value.
    """
    check_quantize(quantize)
    check_mode(gradient_checkpointing)
    spec = LoraSpec.coerce(lora) if lora is not None else LoraSpec()
    if "model_type" not in hf_config_dict:
        raise ValueError("hf_config_dict needs a 'model_type' (e.g. 'llama')")
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(hf_config_dict)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.use_cache = False
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    _materialise(model, config, quantize, dtype, device, gen, quant_storage, double_quant)
    if quantize == "nf4":
        keep_nf4_layout(model)
    model.requires_grad_(False)
    model = attach_lora(model, spec)
    model.train()
    report = None
    if fused:
        report = patch(model, gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing != "off":
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.__dict__["raytune_patch_report"] = report
    return model
