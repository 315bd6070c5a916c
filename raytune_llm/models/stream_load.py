"""Low-memory NF4 loading: a safetensors checkpoint read shard by shard, each linear weight quantized as it lands.

`from_pretrained(quantization_config=...)` in transformers 5 maps every shard before it loads any tensor and keeps
them mapped until loading ends; dense weights that stay unquantized (embeddings, norms, the LM head) are views into
those maps afterwards. Measured on CPU with a 96.5 MiB bf16 checkpoint in 14 shards (NF4 model: 24.5 MiB of tensors):
RSS grew 130 MiB, all 14 shards still mapped and resident after the load.

`load_nf4_streaming` builds the same model without that: the module tree with empty (meta) weights and real
non-persistent buffers (rotary `inv_freq`), transformers' own bitsandbytes quantizer swapping the target Linears for
`Linear4bit` (same modules skipped as `from_pretrained`: `lm_head`, tied and fp32-kept modules), then one shard open at
a time (safetensors `pread` backend: each tensor is read into its own buffer, nothing stays mapped), each tensor moved
to the device and, for a Linear4bit weight, quantized there at once (NF4, double quant, blocksize 64, `quant_storage`),
exactly as transformers' `Bnb4bitQuantize` does. The quantizer's `preprocess_model` / `postprocess_model` set what
`from_pretrained` sets (`hf_quantizer`, `is_quantized`, `is_loaded_in_4bit`, `quantization_method`,
`config.quantization_config`), so PEFT, the export code and `PeftModel.from_pretrained` see no difference; the test
(tests/models/test_stream_load.py) checks every packed weight, quant state and logit against `from_pretrained`.

Host memory is the NF4 model plus one tensor in flight (tests/models/test_load_memory.py measures the peak).
Checkpoints this path does not cover (no safetensors, an already-quantized config, weights transformers merges or
splits while loading; transformers 4.x) raise `StreamUnsupported` before any weight is read, and `load_model` falls
back to `from_pretrained` with a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class StreamUnsupported(ValueError):
    """The checkpoint needs a `from_pretrained` feature the streaming loader does not reproduce."""


def checkpoint_shards(folder: str | Path) -> list[Path]:
    """The safetensors files of a local HF checkpoint, in load order.

    Args:
        folder: a folder with `model.safetensors.index.json` (sharded) or `model.safetensors`.

    Returns:
        The shard paths (one path for a single-file checkpoint).

    Raises:
        StreamUnsupported: neither file exists (e.g. a `.bin` checkpoint).
        FileNotFoundError: the index names a shard that is not in the folder.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [p.name for p in shards if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shard(s) missing from the folder: {', '.join(absent)}")
        return shards
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    raise StreamUnsupported(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}")


@contextlib.contextmanager
def _open_shard(path: Path) -> Iterator[tuple[Any, bool]]:
    """Open one shard for reading; yields (handle, whether its tensors are views into a file map).

    The `pread` backend reads each tensor into its own buffer: nothing of the shard stays mapped, so the host
    holds one tensor in flight instead of the shard's touched pages (peak 45 MiB vs 50 MiB above the start in
    tests/models/test_load_memory.py). Older safetensors lack it: mmap, and the caller copies what it keeps.
    """
    from safetensors import safe_open

    try:
        handle, mapped = safe_open(path, framework="pt", device="cpu", backend="pread"), False
    except TypeError:
        handle, mapped = safe_open(path, framework="pt", device="cpu"), True
    with handle as f:
        yield f, mapped


def _release_freed_host_memory() -> None:
    """Hand the C allocator's freed pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Quantizing on the CPU allocates fp32 temporaries of each weight (~21 bytes an element in bitsandbytes' CPU
    quantize_4bit); glibc keeps the freed ones on its heap, fragmented by the packed weights allocated between them.
    Measured on the checkpoint of tests/models/test_load_memory.py (96.5 MiB bf16, NF4 model 24.5 MiB of tensors):
    without trims RSS ended 88 MiB above the start (peak 97 MiB); trimming after each tensor, 28 MiB (peak 45 MiB).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool, quantizer: Any) -> Any:
    """The causal LM with meta weights and real buffers, Linears swapped for meta `Linear4bit` by the quantizer."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, modeling_utils

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    config.quantization_config = quantizer.quantization_config  # as from_pretrained has it while __init__ runs
    # `set_quantized_state` keeps from_config off deepspeed.zero.Init when a ZeRO-3 config is live, as
    # from_pretrained does for a quantized load (the weights are placed whole by this loader, then partitioned).
    quantized_state = getattr(modeling_utils, "set_quantized_state", contextlib.nullcontext)
    # include_buffers=False: rotary inv_freq and other non-persistent buffers are computed for real, as
    # from_pretrained's re-initialisation computes them (on the CPU), and move to the device afterwards.
    with init_empty_weights(include_buffers=False), quantized_state():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    model.config.name_or_path = str(folder)
    return model


def _quantizer(dtype: torch.dtype, quant_storage: torch.dtype, device: torch.device, double_quant: bool) -> Any:
    from transformers.quantizers import AutoHfQuantizer

    from raytune_llm.models.quantize import bnb_config

    quantizer = AutoHfQuantizer.from_config(bnb_config(dtype, quant_storage, double_quant), pre_quantized=False)
    quantizer.validate_environment(device_map=_device_map(device))
    return quantizer


def _device_map(device: torch.device) -> dict[str, Any]:
    return {"": device.index if device.type == "cuda" else str(device)}


class _KeyMap:
    """Checkpoint key -> model key, with transformers' renamings and base-model prefix rule."""

    def __init__(self, model: Any, quantizer: Any, expected: set[str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model, None, quantizer)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.transforms = transforms
        self.prefix = model.base_model_prefix
        self.expected = expected
        self.meta = dict.fromkeys(expected)  # rename_source_key only tests membership

    def __call__(self, key: str) -> str:
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix, self.meta)
        if pattern is not None:
            raise StreamUnsupported(f"checkpoint key {key!r} is merged or split by transformers while loading")
        if renamed not in self.expected and key in self.expected:
            renamed, _ = rename_source_key(key, [], [], self.prefix, self.meta)
        return renamed


def _ignore_regex(patterns: set[str]) -> re.Pattern | None:
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _unexpected_patterns(model: Any) -> set[str]:
    """What `from_pretrained` drops silently: the model's own patterns, plus stale inv_freq / position_ids keys."""
    patterns = set(model._keys_to_ignore_on_load_unexpected or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return patterns


def _plan(model: Any, shards: list[Path], keymap: _KeyMap) -> list[dict[str, str]]:
    """Read every shard header (no tensor data) and map its keys; fail before any weight is read."""
    skip = _ignore_regex(_unexpected_patterns(model))
    plan = []
    for shard in shards:
        with _open_shard(shard) as (f, _):
            keys = list(f.keys())
        mapping = {}
        for key in keys:
            name = keymap(key)
            if name in keymap.expected:
                mapping[key] = name
            elif skip is None or skip.search(name) is None:
                raise ValueError(f"{shard.name}: unexpected tensor {key!r}: the model has no such parameter or buffer")
        plan.append(mapping)
    return plan


def _place(
    model: Any, name: str, tensor: torch.Tensor, mapped: bool, device: torch.device, dtype: torch.dtype, quantizer: Any
) -> None:
    """Put one checkpoint tensor into the model: quantized on `device` for a Linear4bit weight, else cast and moved."""
    import bitsandbytes as bnb

    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    ref = getattr(module, attr)
    if quantizer.param_needs_quantization(model, name):
        # The dense weight in the compute dtype on the device, quantized there at once (transformers' Bnb4bitQuantize).
        # No copy needed even from a file map: the quantizer reads the dense weight once and the packed result
        # owns its memory.
        value = tensor.to(device=device, dtype=dtype)
        source_cls = getattr(module, "source_cls", None)
        if source_cls is not None and source_cls.__name__ == "Conv1D":
            value = value.T  # GPT-2 style Conv1D stores [in, out]
        _check_shape(name, value, ref)
        new = bnb.nn.Params4bit(value, requires_grad=False, **ref.__dict__).to(device)
        del value
        module._is_hf_initialized = True
    else:
        value = tensor.to(device=device, dtype=ref.dtype, copy=mapped)  # a kept view would pin the file map
        _check_shape(name, value, ref)
        if attr in module._buffers:
            module._buffers[attr] = value
            return
        new = torch.nn.Parameter(value, requires_grad=value.is_floating_point())
    new._is_hf_initialized = True
    setattr(module, attr, new)


def _check_shape(name: str, value: torch.Tensor, ref: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(ref.shape):
        raise ValueError(
            f"tensor {name!r} has shape {tuple(value.shape)} in the checkpoint, the model expects {tuple(ref.shape)}"
        )


def _finish(model: Any, missing: set[str], device: torch.device) -> None:
    """Tie weights as from_pretrained does, refuse missing tensors, move the computed buffers to the device."""
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    skip = _ignore_regex(set(model._keys_to_ignore_on_load_missing or ()))
    missing = sorted(k for k in missing if skip is None or skip.search(k) is None)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}")
    for module_name, module in model.named_modules():
        for attr, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                if buf.device.type == "meta":
                    raise ValueError(f"buffer {module_name}.{attr} has no value (not in the checkpoint, not computed)")
                module._buffers[attr] = buf.to(device)


def _generation_config(folder: Path) -> Any:
    """generation_config.json, else the one built from config.json (what from_pretrained falls back to)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)


def load_nf4_streaming(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quant_storage: torch.dtype = torch.uint8,
    trust_remote_code: bool = False,
    double_quant: bool = True,
) -> Any:
    """Load a local safetensors causal LM with its Linears in bitsandbytes NF4, one shard in memory at a time.

    The result equals `AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
    quantization_config=bnb_config(dtype, quant_storage, double_quant), device_map={"": device})`: same modules, packed weights,
    quant states, dense parameters, buffers, config, generation config and quantizer attributes; in eval mode.

    Args:
        path: local folder with config.json and `model.safetensors` or `model.safetensors.index.json` + shards.
        dtype: dtype of the unquantized weights and the NF4 compute dtype; linear weights are cast to it before
            quantization, as `from_pretrained` does.
        device: where the model lives; a CUDA device needs an index (`load_model` resolves it).
        quant_storage: storage dtype of the packed 4-bit data (bf16 under DeepSpeed ZeRO-3).
        double_quant: quantize the block scales too.
        trust_remote_code: passed to transformers for the config and the model class.

    Returns:
        The transformers causal LM (not PEFT-wrapped), quantized, in eval mode.

    Raises:
        StreamUnsupported: transformers < 5, no safetensors, a pre-quantized checkpoint, or weights transformers
            converts on load (nothing has been read yet; `from_pretrained` can load it).
        ValueError: a tensor of the checkpoint the model does not have, one it needs that the checkpoint lacks,
            or a shape mismatch (one line, naming the tensor).
        FileNotFoundError: the index names a missing shard.
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        # 4.x's from_pretrained already loads shard by shard; this loader follows 5.x's loading internals.
        raise StreamUnsupported(f"transformers {transformers.__version__} < 5")
    folder = Path(path)
    device = torch.device(device)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        raise StreamUnsupported(f"{folder} is an already-quantized checkpoint")
    shards = checkpoint_shards(folder)
    quantizer = _quantizer(dtype, quant_storage, device, double_quant)
    model = _build_skeleton(folder, dtype, trust_remote_code, quantizer)
    quantizer.preprocess_model(
        model=model, dtype=dtype, device_map=_device_map(device), checkpoint_files=[str(s) for s in shards]
    )
    expected = set(model.state_dict().keys())
    keymap = _KeyMap(model, quantizer, expected)
    plan = _plan(model, shards, keymap)
    missing = set(expected)
    with torch.no_grad():
        for shard, mapping in zip(shards, plan):
            with _open_shard(shard) as (f, mapped):
                for key, name in mapping.items():
                    _place(model, name, f.get_tensor(key), mapped, device, dtype, quantizer)
                    missing.discard(name)
                    if device.type == "cpu":  # the quantizer's temporaries were host memory
                        _release_freed_host_memory()
            _release_freed_host_memory()
    _finish(model, missing, device)
    model._weight_conversions = [t for t in keymap.transforms if t.was_used()]
    model.eval()
    model.set_use_kernels(False)  # from_pretrained's default; sets the same attribute
    if model.can_generate():
        model.generation_config = _generation_config(folder)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model
