"""GGUF metadata read back with gguf.GGUFReader: architecture, hyper-parameters, tokenizer, tensor names and types."""

from __future__ import annotations

import pytest

from raytune_llm.export import ExportError, export

from .conftest import build_base, build_run

gguf = pytest.importorskip("gguf")


def _field(reader, key):
    f = reader.fields[key]
    if len(f.types) == 1 and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode() for i in f.data]
        return [int(f.parts[i][0]) for i in f.data]
    return f.parts[f.data[0]][0].item()


def test_gguf_metadata_and_tensors(tmp_path, llama_base):
    from transformers import AutoTokenizer

    run = build_run(tmp_path / "run", llama_base)
    path = export(run, "gguf", gguf_type="q8_0")
    reader = gguf.GGUFReader(path)
    tok = AutoTokenizer.from_pretrained(llama_base)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2 and _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens[:3] == ["<|bos|>", "<|eos|>", "<|pad|>"] and len(tokens) == len(tok)
    assert _field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")) == (0, 1)
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    types = {t.name: t.tensor_type for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["blk.0.attn_norm.weight"] == Q.F32
    assert "output.weight" in types and "token_embd.weight" in types and len(types) == 2 * 9 + 3
    with pytest.raises(ExportError, match="already exists"):
        export(run, "gguf", gguf_type="q8_0")


def test_gguf_llama_q_and_k_biases_take_the_rows_permutation(tmp_path):
    # llama.cpp's "llama" RoPE rotates adjacent pairs: q/k rows are reordered, and so must their biases be.
    import numpy as np
    from safetensors.torch import load_file

    from raytune_llm.export.gguf import _permute

    base = build_base(tmp_path / "base", "llama", attention_bias=True)  # random biases
    path = export(build_run(tmp_path / "run", base), "gguf", gguf_type="f16")
    got = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}
    state = load_file(str(next(base.glob("*.safetensors"))))
    for proj, heads in (("q", 4), ("k", 2)):
        bias = state[f"model.layers.0.self_attn.{proj}_proj.bias"].float()
        want = _permute(bias, heads).numpy()
        assert not np.allclose(want, bias.numpy())  # the permutation moves something
        np.testing.assert_allclose(got[f"blk.0.attn_{proj}.bias"], want, rtol=1e-6, atol=1e-6)
