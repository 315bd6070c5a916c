"""`load_model`: a local HF folder -> (NF4-quantized) base -> PEFT LoRA -> fused kernels, in one call.

With `quantize="nf4"` the base loads through `stream_load.load_nf4_streaming`: one safetensors shard read at a
time, each linear weight quantized to NF4 on the device as it arrives, so host memory stays near one shard plus
one layer above the NF4 model (transformers 5's `from_pretrained` keeps every shard mapped, about the whole bf16
checkpoint resident); the model equals what `from_pretrained` with the same BitsAndBytesConfig gives. Checkpoints
it does not cover, and `quantize=None`, load with `AutoModelForCausalLM.from_pretrained` (SDPA attention). LoRA is
attached by `peft.get_peft_model` (PEFT's own format; the adapter saves and reloads with
`PeftModel.from_pretrained`) and `patch` swaps the fused kernels in per instance.

`prepare_model_for_kbit_training` is not called: it upcasts the LM head to fp32, which made the step
2.3x slower on the H200 (ANCHORS.md); the fused loss works from the bf16 head.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from raytune_llm.models.checkpointing import check_mode
from raytune_llm.models.lora import LoraSpec, attach_lora
from raytune_llm.models.patch import patch
from raytune_llm.models.quantize import bnb_config, check_quantize, keep_nf4_layout
from raytune_llm.models.stream_load import StreamUnsupported, load_nf4_streaming


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
    double_quant: bool = True,
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
        double_quant: with "nf4", quantize the block scales too (`quant.double_quant`; the NF4 merge at export
            reads the same setting from the adapter's raytune_llm.json).

    Returns:
        A `peft.PeftModelForCausalLM` (or the causal LM when `lora` is None), in train mode, with the
        PatchReport at `.raytune_patch_report` (None when `fused=False`).

    Raises:
        FileNotFoundError: `path` is not a folder with a config.json, or a shard its index names is missing.
        ValueError: a bad quantize / gradient_checkpointing / lora value; with "nf4", a checkpoint tensor the
            model lacks, a tensor the model needs that the checkpoint lacks, or a shape mismatch.
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

    model = None
    if quantize == "nf4":
        try:
            model = load_nf4_streaming(folder, dtype, target, quant_storage, trust_remote_code, double_quant)
        except StreamUnsupported as exc:
            warnings.warn(
                f"NF4 load of {folder} without streaming ({exc}): host memory may reach the bf16 size", stacklevel=2
            )
    if model is None:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code)
        # One device per process (Ray / DeepSpeed): the whole model on `target`.
        kwargs["device_map"] = {"": target.index if target.type == "cuda" else str(target)}
        if quantize == "nf4":
            kwargs["quantization_config"] = bnb_config(dtype, quant_storage, double_quant)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    if quantize == "nf4":
        keep_nf4_layout(model)
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
