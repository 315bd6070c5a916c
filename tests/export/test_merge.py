"""Merged HF export: equals the adapter on its base (LoRA and NF4 QLoRA), loads cleanly, re-exports identically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from raytune_llm.export import ExportError, export

from .conftest import adapter_model, build_run

IDS = torch.tensor([[0, 5, 17, 40, 99, 123, 200, 7, 64, 3]])


def _load_merged(folder):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize(
    "bits,lora_kw",
    [(16, {}), (16, {"use_rslora": True, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 3}}), (4, {})],
    ids=["lora", "rslora-patterns", "qlora-nf4"],
)
def test_merged_equals_adapter_on_base(tmp_path, llama_base, bits, lora_kw):
    run = build_run(tmp_path / "run", llama_base, bits=bits, **lora_kw)
    out = export(run, "hf", dtype="fp32")
    assert out == run / "exports" / "hf"
    merged = _load_merged(out)
    ref = adapter_model(run, llama_base, bits)
    with torch.no_grad():
        got, want = merged(IDS).logits, ref(IDS).logits
        with ref.disable_adapter():
            base_logits = ref(IDS).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"merged vs adapter-on-base max abs diff {err:.3g}"
    assert (want - base_logits).abs().max() > 1e-3  # the adapter actually changes the model
    with torch.no_grad():
        g1 = merged.generate(IDS, max_new_tokens=8, do_sample=False, pad_token_id=2)
        g2 = ref.generate(input_ids=IDS, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(g1, g2)


def test_layout_dtype_and_files(tmp_path, llama_base):
    run = build_run(tmp_path / "run", llama_base)
    out = export(run, "hf")  # default bf16
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = llama_base / "model.safetensors"
    with safe_open(str(base_index), "pt") as f:
        base = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert set(index["weight_map"]) == set(base)
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f:
            for k in f.keys():
                assert tuple(f.get_slice(k).get_shape()) == base[k]
                assert f.get_slice(k).get_dtype() == "BF16"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    _load_merged(out)


def test_qlora_config_has_no_quantization(tmp_path, llama_base):
    run = build_run(tmp_path / "run", llama_base, bits=4)
    out = export(run, "hf", dtype="bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_reexport_is_byte_identical_and_merged_base_is_refused(tmp_path, llama_base):
    run = build_run(tmp_path / "run", llama_base)
    first = export(run, "hf", out="exports/a", max_shard_size="100KB")
    second = export(run, "hf", out="exports/b", max_shard_size="100KB")
    files = sorted(p.name for p in first.iterdir())
    assert (
        files == sorted(p.name for p in second.iterdir()) and len([f for f in files if f.endswith(".safetensors")]) > 1
    )
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # An adapter pointed at its own merged export would be added twice: refused.
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(first)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="already this adapter merged"):
        export(run, "hf", out="exports/c")
    # The export folder itself is not a source.
    with pytest.raises(ExportError, match="full model folder"):
        export(first, "hf")


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_are_merged(tmp_path, bias):
    # PEFT saves a bias trained through bias="lora_only"/"all" under the wrapped layer (q_proj.base_layer.bias); the
    # merge used to look for that name in the base checkpoint and refuse the adapter.
    from peft import LoraConfig, get_peft_model

    from .conftest import build_base, load_base

    base = build_base(tmp_path / "base", "qwen2")  # q/k/v carry biases
    model = get_peft_model(
        load_base(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, bias=bias),
    )
    with torch.no_grad():  # stands for training: the biases moved
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.requires_grad:
                p.add_(0.25)
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(f"model:\n  path: {base}\n")
    merged = _load_merged(export(run, "hf", dtype="fp32"))
    with torch.no_grad():
        got, want = merged(IDS).logits, model.eval()(IDS).logits
    assert (got - want).abs().max().item() <= 1e-5
