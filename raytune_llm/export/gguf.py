"""GGUF export (llama.cpp, Ollama) of the merged model, written with the ``gguf`` Python package.

Families: Llama and Mistral (llama.cpp architecture ``llama``) and Qwen2 (``qwen2``). The merge stream of merge.py is
taken in fp32 and each tensor is converted and written as soon as it is merged (tensor infos are declared up front
from shapes, then data is streamed), so memory stays near one tensor.

Conversions follow llama.cpp's ``convert_hf_to_gguf.py``:
- names through ``gguf.get_tensor_name_map`` (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``);
- llama/mistral q and k rows permuted from HF's rotate-half layout to llama.cpp's interleaved RoPE
  (``reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2)``; k uses the kv head count); qwen2 uses NeoX RoPE in
  llama.cpp, so no permute, and its q/k/v biases are written as ``attn_{q,k,v}.bias``;
- 1-D tensors (norms, biases) stay F32; 2-D ones take the requested type, and q8_0 falls back to F16 for rows not a
  multiple of its 32-element block;
- Llama 3 RoPE scaling becomes the ``rope_freqs`` tensor of per-frequency factors.
Tokenizer: byte-level BPE tokenizers (GPT-2 style, Llama 3, Qwen2) with tokens, merges, token types, special ids,
add-bos and the chat template. SentencePiece-style tokenizers (byte_fallback) are refused with a clear error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .merge import adapter_digest, check_not_merged, iter_merged, plan_tensors
from .safety import ExportError, Source

GGUF_TYPES = ("f16", "bf16", "q8_0")
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GGUF_MODEL_TYPES = tuple(_ARCH)  # HF model_type values the GGUF export writes
# tokenizer.json pre-tokenizer regex fragments -> llama.cpp's tokenizer.ggml.pre names (llama-vocab.cpp).
_LLAMA3_DIGITS = "\\p{N}{1,3}"
_QWEN2_PREFIX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF stores q/k rows in rotate-half order; llama.cpp's "llama" RoPE rotates adjacent pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_params(config) -> tuple[float, dict]:
    # transformers 5 keeps rope_theta and scaling together in rope_parameters; older configs split them.
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), scaling


def _llama3_rope_factors(config, head_dim: int) -> torch.Tensor | None:
    theta, scaling = _rope_params(config)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise ExportError(f"GGUF export does not support rope scaling {kind!r}")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _tensor_type(gguf, shape: tuple[int, ...], gguf_type: str):
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1:
        return Q.F32
    if gguf_type == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[gguf_type]


def _encode(gguf, t: torch.Tensor, qtype) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    data = t.float().numpy()
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _pre_tokenizer(tok_json: dict) -> str:
    pre = json.dumps(tok_json.get("pre_tokenizer") or {})
    if _LLAMA3_DIGITS in pre:
        return "llama-bpe"
    if _QWEN2_PREFIX in pre:
        return "qwen2"
    node = tok_json.get("pre_tokenizer") or {}
    if node.get("type") == "ByteLevel" and node.get("use_regex", True):
        return "gpt-2"
    raise ExportError("GGUF export: unknown pre-tokenizer (not GPT-2, Llama 3 or Qwen2 byte-level BPE)")


def check_tokenizer(tok_dir: Path) -> dict:
    """`tok_dir`'s tokenizer.json, when the GGUF export can write it: byte-level BPE with a pre-tokenizer llama.cpp
    knows (GPT-2, Llama 3, Qwen2). `train.preflight` calls it before training, `add_tokenizer` at export.

    Raises:
        ExportError: no tokenizer.json, a SentencePiece / byte_fallback tokenizer, or an unknown pre-tokenizer.
    """
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"GGUF export needs {path} (a fast tokenizer); none found")
    tok_json = json.loads(path.read_text(encoding="utf-8"))
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError("GGUF export supports byte-level BPE tokenizers only (not SentencePiece/byte_fallback)")
    _pre_tokenizer(tok_json)
    return tok_json


def add_tokenizer(gguf, writer, tok_dir: Path, vocab_size: int) -> None:
    """Write the tokenizer metadata of a byte-level BPE tokenizer.

    Raises:
        ExportError: see `check_tokenizer`.
    """
    from transformers import AutoTokenizer

    tok_json = check_tokenizer(tok_dir)
    model = tok_json.get("model", {})
    tok = AutoTokenizer.from_pretrained(tok_dir)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
        else:  # the embedding has more rows than the tokenizer has tokens: llama.cpp needs a name for each
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("unk_token_id", writer.add_unk_token_id),
    ):
        value = getattr(tok, attr, None)
        if value is not None:
            add(int(value))
    with_special = tok("a").input_ids
    plain = tok("a", add_special_tokens=False).input_ids
    writer.add_add_bos_token(tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id] != plain[:1])
    if isinstance(tok.chat_template, str):
        writer.add_chat_template(tok.chat_template)


def write_gguf(source: Source, path: Path, gguf_type: str) -> None:
    """Merge the adapter into the base and write one GGUF file.

    Args:
        source: the resolved export source.
        path: the file to write (a temporary name beside the final .gguf, see `safety.atomic_file`).
        gguf_type: f16, bf16 or q8_0.

    Raises:
        ExportError: unsupported family, type or tokenizer, or a failed merge.
    """
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'raytune-llm[gguf]'") from None
    from transformers import AutoConfig

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    config = AutoConfig.from_pretrained(source.base_dir)
    if config.model_type not in _ARCH:
        raise ExportError(f"GGUF export supports llama, mistral and qwen2, not {config.model_type!r}")
    check_not_merged(source, adapter_digest(source.adapter_dir))
    arch = _ARCH[config.model_type]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    plan = plan_tensors(source.base_dir, torch.float32)
    names = {}
    for p in plan:
        name = name_map.get_name(p.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for tensor {p.name}")
        names[p.name] = name
    vocab_size = next(p.shape[0] for p in plan if p.name.endswith("embed_tokens.weight"))

    writer = gguf.GGUFWriter(path, arch)
    theta, _ = _rope_params(config)
    writer.add_name(source.root.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_file_type(file_type.get(gguf_type, gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_dir = source.adapter_dir if (source.adapter_dir / "tokenizer.json").is_file() else source.base_dir
    add_tokenizer(gguf, writer, tok_dir, vocab_size)

    rope_factors = _llama3_rope_factors(config, head_dim) if arch == "llama" else None
    extra = (
        [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_factors)]
        if rope_factors is not None
        else []
    )
    types = {}
    for name, t in extra:
        types[name] = _tensor_type(gguf, tuple(t.shape), gguf_type)
    for p in plan:
        types[names[p.name]] = _tensor_type(gguf, p.shape, gguf_type)
    shapes = {name: tuple(t.shape) for name, t in extra} | {names[p.name]: p.shape for p in plan}
    for name, qtype in types.items():
        nbytes_shape = gguf.quants.quant_shape_to_byte_shape(shapes[name], qtype)
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
            qtype, np.uint8
        )
        nbytes = int(np.prod(nbytes_shape))  # the byte shape already counts bytes, whatever the type
        shape = nbytes_shape if np_dtype is np.uint8 else shapes[name]
        writer.add_tensor_info(
            name, shape, np.dtype(np_dtype), nbytes, raw_dtype=None if np_dtype is not np.uint8 else qtype
        )
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, t in extra:
            writer.write_tensor_data(_encode(gguf, t, types[name]))
        for p, t in iter_merged(source, plan, compute_dtype=torch.float32):
            # q and k biases (attention_bias=True) take their rows' permutation too, as llama.cpp's converter does.
            if arch == "llama" and p.name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                t = _permute(t, n_head)
            elif arch == "llama" and p.name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                t = _permute(t, n_kv)
            writer.write_tensor_data(_encode(gguf, t, types[names[p.name]]))
    finally:
        writer.close()
