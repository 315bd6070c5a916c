"""Fused QLoRA vs transformers + PEFT + bitsandbytes at Llama-3.1-8B widths (2 layers), bf16, 12 steps.

The GPU test runs the real widths (hidden 4096, intermediate 14336, 32/8 heads, vocab 128256); the CPU
test runs the same code at tiny widths so the path is proven before it spends GPU time. Both stacks are
built by `build_synthetic_model` from the same seed on the same device, so they hold identical NF4 bases
and LoRA initialisations; only `fused` differs.
"""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models.synthetic import build_synthetic_model

WIDTHS_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
)
WIDTHS_TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def run_qlora_parity(
    widths: dict, device: str, batch: int, seq: int, steps: int = 12, tol: float = 1e-2, lr: float = 2e-4
) -> list:
    config = dict(model_type="llama", num_hidden_layers=2, max_position_embeddings=4096, **widths)
    kw = dict(quantize="nf4", lora=dict(r=16, alpha=16), dtype=torch.bfloat16, device=device, seed=0)
    ours = build_synthetic_model(config, fused=True, **kw)
    ref = build_synthetic_model(config, fused=False, **kw)
    assert ours.raytune_patch_report.stock == {}, str(ours.raytune_patch_report)
    with torch.no_grad():  # identical non-zero B in both so every adapter gets a gradient from step 0
        gen = torch.Generator(device=device).manual_seed(1)
        for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
            if "lora_B" in name:
                p_ref.normal_(0.0, 0.01, generator=gen)
                p_ours.copy_(p_ref)
    ids = torch.randint(0, widths["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)
    history = []
    for model in (ref, ours):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        history.append(losses)
        del opt
    ref_losses, our_losses = history
    diffs = [abs(a - b) for a, b in zip(ref_losses, our_losses)]
    assert max(diffs) <= tol, f"losses differ by up to {max(diffs):.4g}: ref {ref_losses} ours {our_losses}"
    assert our_losses[-1] < our_losses[0]
    return history


def test_qlora_parity_tiny_widths_cpu():
    run_qlora_parity(WIDTHS_TINY, device="cpu", batch=2, seq=32, lr=1e-3)


@pytest.mark.gpu
def test_qlora_parity_llama3_8b_widths_gpu():
    # lr 2e-4 as in ANCHORS.md's protocol.
    history = run_qlora_parity(WIDTHS_8B, device="cuda", batch=2, seq=1024)
    print("ref losses:", history[0])
    print("our losses:", history[1])
