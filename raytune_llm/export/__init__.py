"""raytune_llm.export: turn a run's LoRA adapter into something to serve.

``export(source, fmt)`` writes ``runs/<name>/exports/<fmt>/``:

- ``hf``: the adapter merged into its base (dequantized from NF4 for QLoRA runs, so the merged model is the trained
  one), as sharded safetensors + index + config + tokenizer that transformers and vLLM load;
- ``adapter``: the adapter alone in PEFT's layout (PeftModel.from_pretrained, vLLM ``--enable-lora``);
- ``gguf``: the merged model as one GGUF file for llama.cpp (llama, mistral, qwen2; f16, bf16 or q8_0).

Writes are atomic (temporary folder, then rename) and confined to the run folder; see safety.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from .adapter import write_adapter
from .gguf import GGUF_TYPES, write_gguf
from .hf import DEFAULT_MAX_SHARD, write_hf
from .merge import parse_dtype
from .safety import ExportError, atomic_dir, atomic_file, resolve_output, resolve_source

FORMATS = ("hf", "adapter", "gguf")

__all__ = ["FORMATS", "GGUF_TYPES", "ExportError", "export"]


def export(
    source: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    dtype: str = "bf16",
    gguf_type: str = "f16",
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
) -> Path:
    """Export a run's adapter as a merged HF model, a PEFT adapter, or a GGUF file.

    Args:
        source: a run folder (its ``adapter/`` is used) or an adapter folder.
        fmt: "hf", "adapter" or "gguf".
        out: output folder inside the run folder (relative to it, or absolute inside it); default
            ``<run>/exports/<fmt>``, or ``<run>/exports/<fmt>-<source folder name>`` for another adapter of the run
            (a checkpoint's, an earlier export's).
        dtype: dtype of the written weights for hf and adapter: bf16, fp16, fp32, or auto (keep the stored dtype).
            GGUF uses ``gguf_type`` instead.
        gguf_type: f16, bf16 or q8_0 (GGUF only).
        force: replace an existing export.
        max_shard_size: largest safetensors shard for hf, bytes or "5GB"-style.

    Returns:
        The output folder (hf, adapter) or the written ``model-<gguf_type>.gguf`` file inside it (gguf).

    Raises:
        ExportError: bad arguments, an unusable source, an output outside the run, an existing export without force, or
            an adapter/base that cannot be exported; the message is one line.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "gguf" and gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    torch_dtype = parse_dtype(dtype)
    src = resolve_source(source)
    # Another adapter than the run's own (a checkpoint's, an earlier export's) gets its own default folder.
    own = src.adapter_dir in (src.root, src.root / "adapter")  # both resolved by resolve_source
    target = resolve_output(src.root, out, fmt if own else f"{fmt}-{Path(source).expanduser().resolve().name}")
    if src.adapter_dir == target or src.adapter_dir.is_relative_to(target):
        raise ExportError(f"output {target} would replace the adapter being exported; choose another folder")
    exports = src.root / "exports"
    if target.is_relative_to(src.adapter_dir) and not target.is_relative_to(exports):  # exports/ of a bare adapter
        raise ExportError(f"output {target} is inside the adapter being exported; choose another folder")
    if target.exists() and not (target != exports and target.is_relative_to(exports)):
        # --force replaces an earlier export only, never checkpoints, the tokenizer or the exports folder itself
        raise ExportError(f"output {target} exists and is not an earlier export inside {exports}; choose a new folder")
    base = src.base_dir.resolve()
    if base == target.resolve() or base.is_relative_to(target.resolve()) or target.resolve().is_relative_to(base):
        raise ExportError(f"output {target} would replace or sit inside the base model {base}; choose another folder")
    if fmt == "gguf":  # one file per type in the folder: another type's file stays
        with atomic_file(target / f"model-{gguf_type}.gguf", force) as tmp:
            write_gguf(src, tmp, gguf_type)
        return target / f"model-{gguf_type}.gguf"
    with atomic_dir(target, force) as tmp:
        if fmt == "hf":
            write_hf(src, tmp, torch_dtype, max_shard_size)
        else:
            write_adapter(src, tmp, torch_dtype)
    return target
