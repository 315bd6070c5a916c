"""Merge a PEFT LoRA adapter into its base model, streaming one tensor at a time.

For every base linear weight ``W [out, in]`` with an adapter, the merged weight is

    W' = deq(W) + s * (B @ A)        s = alpha / r   (alpha / sqrt(r) with use_rslora)

computed in fp32 and cast to the target dtype once, at the end. ``A [r, in]`` and ``B [out, r]`` are PEFT's
``lora_A.weight`` / ``lora_B.weight``; r is A's row count (so ``rank_pattern`` is honoured) and alpha follows
``alpha_pattern`` with PEFT's own key matching.

``deq`` is the identity for a 16-bit run. For a 4-bit run the training forward never saw ``W``: it saw bitsandbytes'
NF4 rounding of ``W`` in the load dtype. So *every* linear weight that bitsandbytes quantized (not only those with an
adapter, and never the output embedding, which transformers keeps in full precision) is quantized with
``bitsandbytes.functional.quantize_4bit`` (nf4, blocksize and double quant from raytune_llm.json) and dequantized in
fp32, and the merged model equals the trained one instead of differing by the NF4 error (~1e-2 relative per weight).

Memory: base shards are opened one at a time with ``safe_open`` (mmap) and closed before the next, so the resident set
is about one input tensor, its fp32 copy and the adapter, never the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .safety import ADAPTER_CONFIG, ExportError, Source

ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_MARKER = "raytune_llm_export.json"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class LoraUpdate:
    """One module's low-rank update: ``delta = scaling * B @ A`` (transposed when fan_in_fan_out)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool

    def delta(self) -> torch.Tensor:
        """Return the fp32 update in the base weight's layout."""
        d = (self.B.float() @ self.A.float()) * self.scaling
        return d.T if self.fan_in_fan_out else d


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor of the base checkpoint: its name, shard, shape and the dtype it is written in."""

    name: str
    shard: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def parse_dtype(dtype: str) -> torch.dtype | None:
    """Map a dtype option to torch; "auto" keeps each tensor's checkpoint dtype (returns None).

    Raises:
        ExportError: an unknown name.
    """
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32, auto")
    return DTYPES[dtype]


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 of what an adapter adds to a model: its weights and the config fields that set the update.

    The base path is left out on purpose, so an adapter re-pointed at its own merged export is still recognised.
    """
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    for key in ("base_model_name_or_path", "revision", "inference_mode"):
        cfg.pop(key, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    with open(adapter_dir / ADAPTER_WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_adapter_config(adapter_dir: Path) -> dict:
    """Read adapter_config.json and reject what a merge cannot reproduce.

    Raises:
        ExportError: not a LoRA adapter, DoRA, or no adapter_model.safetensors.
    """
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r} is not LORA; only LoRA adapters export")
    if cfg.get("use_dora"):
        raise ExportError(f"{adapter_dir}: DoRA adapters (use_dora=true) are not supported by export")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ExportError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (a .bin adapter? re-save with safetensors)")
    return cfg


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    # Same matching rule as peft.utils.other.get_pattern_key, so the scaling equals the one PEFT used in training.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(adapter_dir: Path) -> tuple[dict[str, LoraUpdate], dict[str, torch.Tensor]]:
    """Load an adapter's updates keyed by the base weight they change.

    Args:
        adapter_dir: a PEFT adapter folder.

    Returns:
        (updates, replacements): ``updates["model.layers.0.self_attn.q_proj.weight"]`` is that weight's LoRA update;
        ``replacements`` holds whole tensors saved through ``modules_to_save``, keyed by base tensor name.

    Raises:
        ExportError: unsupported adapter contents (embedding LoRA, LoRA biases, a lone A or B).
    """
    cfg = read_adapter_config(adapter_dir)
    state = load_adapter_weights(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        if "lora_embedding_" in name or "lora_magnitude_vector" in name:
            raise ExportError(f"{adapter_dir}: {key} (embedding LoRA or DoRA) is not supported by export")
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = tensor
        elif ".lora_" in name:
            raise ExportError(f"{adapter_dir}: unsupported adapter tensor {key} (e.g. lora_bias); cannot merge it")
        else:
            # modules_to_save: a full copy of a base tensor, saved under the base name; a bias trained through PEFT's
            # bias="all" / "lora_only" is saved under the wrapped layer's name (q_proj.base_layer.bias).
            name = re.sub(r"\.modules_to_save(\.[^.]+)?(?=\.)", "", name)
            replacements[name.replace(".base_layer.", ".")] = tensor
    updates = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{adapter_dir}: {module} has lora_{''.join(ab)} without its pair")
        r = ab["A"].shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        updates[module + ".weight"] = LoraUpdate(ab["A"], ab["B"], float(scaling), bool(cfg.get("fan_in_fan_out")))
    if not updates and not replacements:
        raise ExportError(f"{adapter_dir}/{ADAPTER_WEIGHTS} holds no LoRA tensors")
    return updates, replacements


def base_shards(base_dir: Path) -> list[Path]:
    """List the base checkpoint's safetensors files in order.

    Raises:
        ExportError: the base has no safetensors weights.
    """
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [base_dir / f for f in sorted(set(weight_map.values()))]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportError(f"base model {base_dir} has no safetensors weights; re-save it with safe_serialization=True")


def _unreadable(path: Path, exc: BaseException) -> ExportError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ExportError(f"{path}: not a readable safetensors file ({reason})")


def load_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors.

    Raises:
        ExportError: the weights file is missing, truncated or not safetensors.
    """
    path = adapter_dir / ADAPTER_WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None


def plan_tensors(base_dir: Path, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """Read names, shapes and dtypes of the base checkpoint without loading any tensor.

    Args:
        base_dir: the base model folder.
        dtype: output dtype for floating tensors (None keeps the checkpoint's); integer tensors keep theirs.

    Returns:
        One entry per tensor, in shard then name order.
    """
    plan = []
    for shard in base_shards(base_dir):
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    src = _ST_DTYPES[sl.get_dtype()]
                    out = dtype if (dtype is not None and src.is_floating_point) else src
                    plan.append(PlannedTensor(name, shard, tuple(sl.get_shape()), out))
        except (SafetensorError, OSError) as exc:
            raise _unreadable(shard, exc) from None
    return plan


def quantized_weight_names(base_dir: Path) -> set[str]:
    """Names of the weights bitsandbytes quantizes when this base is loaded in 4 bits.

    Builds the architecture on the meta device (no memory) and applies transformers' own rule: every nn.Linear except
    the output embedding, tied weights and the last module (``get_keys_to_not_convert``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = get_keys_to_not_convert(model)
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(name == k or name.endswith("." + k) for k in skip):
            names.add(name + ".weight")
    return names


# Elements per bitsandbytes call in the NF4 round trip. bnb's CPU quantizer builds a [n, 16] distance table (64 bytes
# per element), so one call on a whole 14336x4096 weight would need ~3.7 GB; 2**17 elements keep it near 8 MB
# (whole-export peak-RSS growth measured on a 193 MiB, 32-shard model: 38 MiB 16-bit, 15 MiB NF4 after a warm export).
_NF4_CHUNK = 1 << 17


def nf4_roundtrip(weight: torch.Tensor, quant: dict) -> torch.Tensor:
    """Return the fp32 dequantization of bitsandbytes' NF4 quantization of ``weight``, as training saw it.

    The weight is first cast to the run's compute/load dtype (what bitsandbytes quantized when the model loaded).
    NF4 blocks are independent, so codes and block absmax are computed in chunks of whole blocks; double quantization
    (8-bit blockwise over ``absmax - mean(absmax)``, blocksize 256) then runs once over all block absmax values, as
    ``bitsandbytes.functional.quantize_4bit`` does. The result is bit-identical to quantize_4bit + dequantize_4bit on
    the whole tensor (tested) with memory bounded by the chunk size.
    """
    import bitsandbytes.functional as bnbf

    load_dtype = DTYPES.get(str(quant.get("compute_dtype", "bfloat16")).replace("torch.", ""), torch.bfloat16)
    blocksize = int(quant.get("blocksize", 64))
    flat = weight.to(load_dtype).reshape(-1)
    step = max(blocksize, _NF4_CHUNK // blocksize * blocksize)
    packed, absmax = [], []
    for seg in flat.split(step):
        p, a = torch.ops.bitsandbytes.quantize_4bit.default(seg, blocksize, "nf4", torch.uint8)
        packed.append(p.reshape(-1))
        absmax.append(a.reshape(-1))
    scales = torch.cat(absmax)
    if quant.get("double_quant", True):
        offset = scales.mean()
        qabsmax, state2 = bnbf.quantize_blockwise(scales - offset, blocksize=256)
        scales = bnbf.dequantize_blockwise(qabsmax, state2)
        scales += offset
    scales = scales.float()
    out = torch.empty(flat.numel(), dtype=torch.float32)
    blocks_per_step = step // blocksize
    for i, p in enumerate(packed):
        seg_out = out[i * step : (i + 1) * step]
        absmax_seg = scales[i * blocks_per_step : (i + 1) * blocks_per_step]
        seg_out.copy_(
            torch.ops.bitsandbytes.dequantize_4bit.default(
                p.reshape(-1, 1), absmax_seg, blocksize, "nf4", seg_out.shape, torch.float32
            ).reshape(-1)
        )
    return out.reshape(weight.shape)


def check_not_merged(source: Source, digest: str) -> None:
    """Refuse to merge an adapter into a base that already carries it (the update would be added twice).

    Raises:
        ExportError: the base folder is our own merged export of this very adapter, or a bnb-quantized checkpoint.
    """
    marker = source.base_dir / EXPORT_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("adapter_sha256") == digest:
            raise ExportError(
                f"base {source.base_dir} is already this adapter merged into its base; merging again would add it twice"
            )
    config = json.loads((source.base_dir / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise ExportError(
            f"base {source.base_dir} is a quantized checkpoint; point the adapter at the unquantized base"
        )


def iter_merged(
    source: Source, plan: list[PlannedTensor], compute_dtype: torch.dtype | None = None
) -> Iterator[tuple[PlannedTensor, torch.Tensor]]:
    """Yield each base tensor merged with the adapter, in plan order, one shard open at a time.

    Args:
        source: the resolved export source.
        plan: from :func:`plan_tensors`.
        compute_dtype: yield floating tensors in this dtype instead of the planned one (the GGUF writer asks for fp32).

    Yields:
        (planned tensor, merged tensor in the planned dtype or ``compute_dtype``).

    Raises:
        ExportError: an adapter module that is not in the base, or a shape mismatch.
    """
    updates, replacements = read_adapter(source.adapter_dir)
    names = {p.name for p in plan}
    missing = sorted((set(updates) | set(replacements)) - names)
    if missing:
        raise ExportError(f"adapter targets {missing[0]} which the base checkpoint does not have ({len(missing)} such)")
    quantized = quantized_weight_names(source.base_dir) if source.quant.get("quant_bits") == 4 else set()
    open_shard, handle = None, None
    try:
        for p in plan:
            if p.shard != open_shard:
                if handle is not None:
                    handle.__exit__(None, None, None)
                handle = safe_open(str(p.shard), framework="pt")
                f = handle.__enter__()
                open_shard = p.shard
            t = replacements[p.name] if p.name in replacements else f.get_tensor(p.name)
            nf4 = p.name in quantized and p.name not in replacements
            if nf4 or p.name in updates:
                w = nf4_roundtrip(t, source.quant) if nf4 else t.float()
                if p.name in updates:
                    delta = updates[p.name].delta()
                    if delta.shape != w.shape:
                        raise ExportError(f"adapter update for {p.name} has shape {tuple(delta.shape)}, base {p.shape}")
                    w = w + delta
                t = w
            out = compute_dtype if (compute_dtype is not None and t.is_floating_point()) else p.dtype
            yield p, t.to(out).contiguous()
    finally:
        if handle is not None:
            handle.__exit__(None, None, None)
