"""Adapter-only export in PEFT's on-disk format, as vLLM's LoRA loader (``--enable-lora``) reads it.

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (no adapter name inside the key: PEFT strips it on
save and vLLM rejects keys it cannot map). Adapters saved from a raw state dict (``...lora_A.default.weight``) are
normalised. Weights are cast to the requested dtype; ``auto`` keeps them as trained (fp32 for PEFT by default).
The config is written with ``inference_mode: true`` and sorted keys; base_model_name_or_path is kept, as vLLM only
reads it for display.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .hf import copy_tokenizer
from .merge import ADAPTER_WEIGHTS, load_adapter_weights, read_adapter, read_adapter_config
from .safety import ADAPTER_CONFIG, RUN_META, ExportError, Source

_PREFIX = "base_model.model."
_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def write_adapter(source: Source, out: Path, dtype: torch.dtype | None) -> None:
    """Write the run's adapter into ``out`` (an empty folder) in PEFT/vLLM layout.

    Args:
        source: the resolved export source.
        out: the (temporary) output folder.
        dtype: cast LoRA weights to this dtype; None keeps the trained dtype.

    Raises:
        ExportError: the adapter is not a plain LoRA adapter (see merge.read_adapter).
    """
    config = read_adapter_config(source.adapter_dir)
    read_adapter(source.adapter_dir)  # validates contents (pairs complete, no embedding LoRA / DoRA) with clear errors
    state = load_adapter_weights(source.adapter_dir)
    tensors = {}
    for key, t in state.items():
        name = _ADAPTER_NAME.sub(r".\1.weight", key)
        if not name.startswith(_PREFIX):
            name = _PREFIX + name
        if name in tensors:
            raise ExportError(f"{source.adapter_dir}: two tensors map to {name}; the adapter holds several adapters")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config["inference_mode"] = True
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (source.adapter_dir / RUN_META).is_file():
        (out / RUN_META).write_bytes((source.adapter_dir / RUN_META).read_bytes())
    if (source.adapter_dir / "tokenizer_config.json").is_file():
        copy_tokenizer(source, out)
