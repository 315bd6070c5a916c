"""patch/unpatch: per instance, reversible, reported; stock fallbacks; PEFT adapter format; load errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from tests.models.conftest import VOCAB, sync_and_randomise_lora


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(3))


def test_unpatch_restores_stock_forwards_and_patch_is_per_instance(tiny_paths):
    lora = dict(r=4, alpha=8)
    model = load_model(tiny_paths["qwen3"], lora=lora, dtype=torch.float32, device="cpu")
    other = load_model(tiny_paths["qwen3"], lora=lora, dtype=torch.float32, device="cpu", fused=False)
    sync_and_randomise_lora(other, model)
    report = model.raytune_patch_report
    assert report.family == "qwen3" and report.stock == {}
    assert "model.layers.0.self_attn.q_norm: rms_norm" in report.replaced
    # The unpatched twin of the same class is untouched: nothing was assigned on a class.
    assert not any("forward" in m.__dict__ for m in other.modules())
    with torch.no_grad():
        fused = model(_ids()).logits
        stock = other(_ids()).logits
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)
    unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, stock, rtol=0, atol=0)
    again = patch(model)
    assert again.replaced == report.replaced
    assert patch(model) is again  # idempotent


def test_lora_dropout_takes_the_stock_path_with_the_same_numbers(tiny_paths):
    lora = dict(r=4, alpha=8, dropout=0.2, target_modules=["q", "v", "gate", "up", "down"])
    ours = load_model(tiny_paths["mistral"], lora=lora, dtype=torch.float32, device="cpu")
    ref = load_model(tiny_paths["mistral"], lora=lora, dtype=torch.float32, device="cpu", fused=False)
    sync_and_randomise_lora(ref, ours)
    stock = ours.raytune_patch_report.stock
    assert "dropout" in stock["model.layers.0.self_attn.qkv"]
    assert "dropout" in stock["model.layers.1.mlp.fused"]
    ids = _ids()
    torch.manual_seed(11)
    loss_ours = ours(input_ids=ids, labels=ids).loss
    torch.manual_seed(11)
    loss_ref = ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-5)


def test_trainable_base_bias_takes_the_stock_path_with_the_same_numbers(tiny_paths):
    lora = dict(r=4, alpha=8, bias="lora_only")  # Qwen2's q/k/v biases become trainable
    ours = load_model(tiny_paths["qwen2"], lora=lora, dtype=torch.float32, device="cpu")
    ref = load_model(tiny_paths["qwen2"], lora=lora, dtype=torch.float32, device="cpu", fused=False)
    sync_and_randomise_lora(ref, ours)
    assert "bias" in ours.raytune_patch_report.stock["model.layers.0.self_attn.qkv"]
    assert "model.layers.0.self_attn.o_proj" not in ours.raytune_patch_report.stock  # o_proj has no bias
    ids = _ids()
    loss_ours, loss_ref = ours(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-5)
    loss_ours.backward()
    loss_ref.backward()
    bias = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
    torch.testing.assert_close(
        dict(ours.named_parameters())[bias].grad, dict(ref.named_parameters())[bias].grad, rtol=1e-5, atol=1e-6
    )


def test_unknown_architecture_trains_stock_with_one_warning():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = patch(model)
    ours = [w for w in caught if "raytune_llm" in str(w.message)]
    assert len(ours) == 1 and "gpt2" in str(ours[0].message)
    assert report.family is None and report.replaced == []
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_saved_adapter_loads_unchanged_with_peft(tiny_paths, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_paths["qwen2"], lora=dict(r=4, alpha=8, use_rslora=True), dtype=torch.float32, device="cpu")
    sync_and_randomise_lora(model, model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_paths["qwen2"], dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, plain(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_labels_give_loss_without_logits_and_generation_still_works(tiny_paths):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu").eval()
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss.ndim == 0
    generated = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(quantize="int8"), ValueError, "quantize must be"),
        (dict(lora=dict(rank=4)), ValueError, "unknown lora key"),
        (dict(lora=dict(r=0)), ValueError, "lora.r must be"),
        (dict(lora=dict(target_modules=["nope"])), ValueError, "match no module"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_paths, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_model(tiny_paths["llama"], dtype=torch.float32, device="cpu", **kwargs)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nothing")


def test_patch_before_peft_still_runs_the_adapters(tiny_paths):
    """Patching a bare model and attaching LoRA afterwards (PEFT swaps the projections) stays correct."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM")
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_paths["llama"], dtype=torch.float32), config)
    bare = AutoModelForCausalLM.from_pretrained(tiny_paths["llama"], dtype=torch.float32)
    report = patch(bare)
    assert "not a LoRA layer" in report.stock["model.layers.0.self_attn.qkv"]
    ours = get_peft_model(bare, config)
    sync_and_randomise_lora(ref, ours)
    ids = _ids()
    out = ours(input_ids=ids, labels=ids)
    assert out.logits is None  # PEFT froze the head after patching: the fused loss runs
    torch.testing.assert_close(out.loss, ref(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
