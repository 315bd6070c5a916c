"""Adapter export: PEFT's layout with vLLM-style keys, loadable by PeftModel.from_pretrained, same outputs."""

from __future__ import annotations

import json
import re

import torch
from safetensors import safe_open

from raytune_llm.export import export

from .conftest import adapter_model, build_run, load_base

KEY = re.compile(r"^base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight$")


def test_adapter_export_loads_in_peft(tmp_path, llama_base):
    from peft import PeftModel

    run = build_run(tmp_path / "run", llama_base)
    out = export(run, "adapter", dtype="auto")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["inference_mode"] is True
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(KEY.match(k) for k in keys), keys[:3]
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    ids = torch.tensor([[0, 9, 33, 77, 150]])
    exported = PeftModel.from_pretrained(load_base(llama_base), out).eval()
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, adapter_model(run, llama_base)(ids).logits)

    out16 = export(run, "adapter", out="exports/adapter-bf16")  # default dtype bf16
    with safe_open(str(out16 / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    PeftModel.from_pretrained(load_base(llama_base), out16)
