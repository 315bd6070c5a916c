"""Write a merged model as a transformers / vLLM checkpoint: safetensors shards + index, config, tokenizer.

Shards are written by hand in the safetensors format (8-byte header length, JSON header, raw little-endian data) so
each tensor goes to disk as soon as it is merged: the shard layout is planned from shapes alone, and no shard is ever
held in memory. Output is byte-for-byte deterministic (sorted JSON, no timestamps), so exporting twice gives the same
files. Tensor names and shapes are the base checkpoint's; floating tensors take the requested dtype.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import torch

from .merge import EXPORT_MARKER, PlannedTensor, adapter_digest, check_not_merged, iter_merged, plan_tensors
from .safety import ExportError, Source

DEFAULT_MAX_SHARD = 5 * 10**9  # transformers' default "5GB", and what vLLM and the hub expect
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_ST_NAMES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def parse_size(size: int | str) -> int:
    """Parse a shard size given in bytes or as "200MB" / "5GB" (decimal units, as transformers does).

    Raises:
        ExportError: not a positive size.
    """
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(size).upper())
        if not m:
            raise ExportError(f"cannot read shard size {size!r}; use bytes or e.g. '500MB', '5GB'")
        n = int(
            float(m[1])
            * {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}[m[2]]
        )
    if n <= 0:
        raise ExportError(f"shard size must be positive, got {size!r}")
    return n


def _nbytes(p: PlannedTensor) -> int:
    n = p.dtype.itemsize
    for d in p.shape:
        n *= d
    return n


def shard_plan(plan: list[PlannedTensor], max_shard: int) -> list[list[PlannedTensor]]:
    """Split tensors greedily into shards of at most ``max_shard`` bytes (a larger single tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in plan:
        n = _nbytes(p)
        if shards[-1] and size + n > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += n
    return shards


def _header(tensors: list[PlannedTensor]) -> bytes:
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in tensors:
        n = _nbytes(p)
        entries[p.name] = {"dtype": _ST_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_tokenizer(source: Source, out: Path) -> list[str]:
    """Copy tokenizer files into ``out``: the adapter folder's own when it has them, else the base model's.

    Returns:
        The names of the files copied.
    """
    src = source.adapter_dir if (source.adapter_dir / "tokenizer_config.json").is_file() else source.base_dir
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def write_config(source: Source, out: Path, dtype: torch.dtype | None) -> None:
    """Write config.json (quantization_config dropped, dtype set) and generation_config.json."""
    config = json.loads((source.base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = _TORCH_DTYPE_NAMES[dtype]
    _write_json(out / "config.json", config)
    gen = source.base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
    else:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        _write_json(out / "generation_config.json", {k: config[k] for k in keys if config.get(k) is not None})


def write_hf(
    source: Source, out: Path, dtype: torch.dtype | None, max_shard_size: int | str = DEFAULT_MAX_SHARD
) -> None:
    """Merge the adapter into the base and write a complete HF model folder into ``out`` (an empty folder).

    Args:
        source: the resolved export source.
        out: the (temporary) output folder.
        dtype: dtype of floating tensors, None to keep the checkpoint's.
        max_shard_size: the largest shard, bytes or "5GB"-style.

    Raises:
        ExportError: the merge is not possible (see merge.py).
    """
    max_shard = parse_size(max_shard_size)
    digest = adapter_digest(source.adapter_dir)
    check_not_merged(source, digest)
    plan = plan_tensors(source.base_dir, dtype)
    shards = shard_plan(plan, max_shard)
    files = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for p in tensors:
            files[p.name] = fname
    merged = iter_merged(source, plan)
    total = 0
    for tensors in shards:
        with open(out / files[tensors[0].name], "wb") as f:
            f.write(_header(tensors))
            for expected in tensors:
                p, t = next(merged)
                assert p is expected  # iter_merged yields in plan order
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                total += _nbytes(p)
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": files})
    write_config(source, out, dtype)
    copy_tokenizer(source, out)
    _write_json(
        out / EXPORT_MARKER,
        {
            "format": "hf",
            "adapter_sha256": digest,
            "base_model": str(source.base_dir),
            "quant_bits": source.quant.get("quant_bits", 16),
            "dtype": _TORCH_DTYPE_NAMES.get(dtype, "auto"),
        },
    )
