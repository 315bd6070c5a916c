"""build_synthetic_model: a random model built module by module, NF4 as it materialises, LoRA + fused."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models.synthetic import build_synthetic_model

CONFIG = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_synthetic_model_builds_trains_and_is_deterministic(quantize):
    kw = dict(quantize=quantize, lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu", seed=5)
    model = build_synthetic_model(CONFIG, gradient_checkpointing="on", **kw)
    assert model.raytune_patch_report.stock == {}
    assert not any(p.is_meta for p in model.parameters())
    q_base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q_base).__name__ == ("Linear4bit" if quantize else "Linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    twin = build_synthetic_model(CONFIG, **kw)
    a = model.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight
    b = twin.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight
    assert torch.equal(a.data, b.data)


def test_synthetic_needs_a_model_type():
    with pytest.raises(ValueError, match="model_type"):
        build_synthetic_model({"hidden_size": 64}, device="cpu")
