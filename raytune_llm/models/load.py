"""`load_model`: a local HF folder -> (NF4-quantized) base -> PEFT LoRA -> fused kernels, in one call.

The base loads with `AutoModelForCausalLM.from_pretrained` (SDPA attention; bitsandbytes quantizes to
NF4 while the shards load when `quantize="nf4"`, so the bf16 model is never whole in memory). LoRA is
attached by `peft.get_peft_model` (PEFT's own format; the adapter saves and reloads with
`PeftModel.from_pretrained`) and `patch` swaps the fused kernels in per instance.

`prepare_model_for_kbit_training` is not called: it upcasts the LM head to fp32, which made the step
2.3x slower on the H200 (ANCHORS.md); the fused loss works from the bf16 head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from raytune_llm.models.checkpointing import check_mode
from raytune_llm.models.lora import LoraSpec, attach_lora
from raytune_llm.models.patch import patch
from raytune_llm.models.quantize import bnb_config, check_quantize


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # device_map wants a concrete index
    return device


def load_model(
    path: str | os.PathLike,
    quantize: str | None = None,
    lora: LoraSpec | dict | None = None,
    gradient_checkpointing: str = "off",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    fused: bool = True,
    trust_remote_code: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> Any:
    """Load a causal LM from a local folder, optionally NF4-quantized, with LoRA and the fused kernels.

    Args:
        path: local folder with config.json and safetensors weights (Llama, Mistral, Qwen2, Qwen3 fused;
            other architectures load and train on stock modules with one warning).
        quantize: "nf4" (bitsandbytes NF4, double quant, compute dtype = `dtype`) or None.
        lora: LoraSpec or a dict of its fields (r, alpha, dropout, target_modules, use_rslora, bias);
            None returns the (patched) base model without adapters.
        gradient_checkpointing: "off", "on" (recompute each decoder layer) or "offload" (also keep the
            layer inputs in pinned host memory).
        dtype: dtype of the non-quantized weights and of the compute (bf16 on GPU, fp32 in CPU tests).
        device: target device; default the current CUDA device, else the CPU.
        fused: swap in the fused kernels (False = plain transformers + PEFT, for comparisons).
        trust_remote_code: passed to transformers.
        quant_storage: packed 4-bit storage dtype (bf16 under DeepSpeed ZeRO-3).

    Returns:
        A `peft.PeftModelForCausalLM` (or the causal LM when `lora` is None), in train mode, with the
        PatchReport at `.raytune_patch_report` (None when `fused=False`).

    Raises:
        FileNotFoundError: `path` is not a folder with a config.json.
        ValueError: a bad quantize / gradient_checkpointing / lora value.
    """
    check_quantize(quantize)
    check_mode(gradient_checkpointing)
    spec = LoraSpec.coerce(lora)
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model path {str(folder)!r} is not a local HF folder with a config.json")
    target = _resolve_device(device)
    if quantize == "nf4" and target.type == "cpu" and dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"NF4 on the CPU computes in float32 or bfloat16, got dtype={dtype}")

    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code)
    # Weights land shard by shard straight on the device (bitsandbytes quantizes each as it lands), so
    # neither host nor device holds the whole dense model; one device per process (Ray / DeepSpeed).
    kwargs["device_map"] = {"": target.index if target.type == "cuda" else str(target)}
    if quantize == "nf4":
        kwargs["quantization_config"] = bnb_config(dtype, quant_storage)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    if spec is not None:
        model = attach_lora(model, spec)
    model.train()
    report = None
    if fused:
        report = patch(model, gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing != "off":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Plain attribute on the instance: PEFT forwards unknown attribute reads to the base model.
    model.__dict__["raytune_patch_report"] = report
    return model
