"""The LM head in pinned host memory, streamed in by the loss (`settings.set_head_on_host`).

On the CPU: what the setter refuses, that the patched loss takes the streamed path once it is on (and not before),
with the loss and LoRA gradients of the device path (the kernels' own tests are in tests/kernels), the config and
trainer rules, and the planner's memory. On the GPU: a bf16 NF4 model trains with the head on the host as with it
on the device, frees the head's memory, generates, and gives the head back unchanged.
"""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models.load import load_model
from raytune_llm.models.patch import unpatch
from raytune_llm.models.settings import set_head_on_host
from tests.models.conftest import VOCAB, nf4_cuda_model, sync_and_randomise_lora
from tests.models.test_memory_settings import _step


def test_head_on_host_refuses_what_it_cannot_serve(tiny_paths):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="true or false"):
        set_head_on_host(model, 1)
    lm = model.get_base_model()
    lm.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head weight is trainable"):
        set_head_on_host(model, True)
    lm.lm_head.weight.requires_grad_(False)
    head = lm.lm_head.weight
    lm.lm_head.weight = lm.get_input_embeddings().weight  # tied, as tie_word_embeddings makes it
    with pytest.raises(ValueError, match="tied to the input embedding"):
        set_head_on_host(model, True)
    lm.lm_head.weight = head
    unpatch(model)
    with pytest.raises(ValueError, match="patched by raytune_llm.patch"):
        set_head_on_host(model, True)


def test_the_loss_takes_the_streamed_path_with_the_device_paths_numbers(tiny_paths, monkeypatch):
    # Calls into the streamed loss are counted (the op is looked up when the model is patched). On a CPU model
    # nothing moves; the loss and every LoRA gradient are those of the head-on-device path (under the interpreter
    # both run their kernels: equal to fp32 rounding; without it both run the reference: equal).
    import raytune_llm.kernels.cross_entropy_streamed as cs

    calls = []
    real = cs.streamed_linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cs, "streamed_linear_cross_entropy", counted)
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    sync_and_randomise_lora(model, model)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss_dev, g_dev = _step(model, ids)
    assert not calls
    set_head_on_host(model, True)
    assert not model.raytune_patch_report.head_on_host  # a CPU model's head is on the host already
    loss_host, g_host = _step(model, ids)
    assert calls == [(VOCAB, model.get_base_model().config.hidden_size)]
    torch.testing.assert_close(loss_host, loss_dev, rtol=1e-5, atol=1e-6)
    for name in g_dev:
        torch.testing.assert_close(g_host[name], g_dev[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no labels: logits as HF computes them
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, VOCAB)
    set_head_on_host(model, False)
    _step(model, ids)
    assert len(calls) == 1


def test_head_on_host_and_last_layer_config_trainer_and_planner(tmp_path):
    from raytune_llm.config import ConfigError, load_config
    from raytune_llm.models.tiny import build_tiny_model
    from raytune_llm.sharding.planner import LLAMA31_8B, plan_from_values
    from raytune_llm.train.sharded import apply_host_weights

    with pytest.raises(ConfigError, match="head_on_host=true needs fused=true"):
        load_config(None, ["model.head_on_host=true", "model.fused=false"])
    with pytest.raises(ConfigError, match="head_on_host needs sharding.strategy ddp or auto"):
        load_config(None, ["model.head_on_host=true", "sharding.strategy=zero2"])
    # No effect outside offloaded checkpointing, so a conf that sets it still takes model.gradient_checkpointing=on
    # (not refused: load_config raises on any rule it breaks).
    load_config(None, ["model.last_layer_on_device=true", "model.gradient_checkpointing=on"])
    on = load_config(None, ["model.head_on_host=true", "model.embeddings_on_host=true"])
    assert on.model.head_on_host
    tied = load_model(
        build_tiny_model(tmp_path / "tied", vocab_size=VOCAB, tie_word_embeddings=True),
        lora=dict(r=4, alpha=8),
        dtype=torch.float32,
        device="cpu",
    )
    why = apply_host_weights(tied, on, "ddp")  # a memory saving: left off, said why, the run goes on
    assert "embeddings_on_host: the input embedding is tied" in why and "head_on_host: the LM head is tied" in why
    assert apply_host_weights(tied, on, "zero3") == (
        "embeddings_on_host: zero3 places every weight itself; head_on_host: zero3 places every weight itself"
    )
    # The planner: the head's bytes move to the host; the loss phase holds the streamed loss's workspace.
    kw = dict(seq_len=2048, micro_batch=4, checkpointing="offload", gpu_mem_gib=141.0)
    dev, host = plan_from_values(LLAMA31_8B, **kw), plan_from_values(LLAMA31_8B, head_on_host=True, **kw)
    head = 2 * 128256 * 4096
    assert dev.strategy == host.strategy == "DDP"
    b_dev, b_host = dev.breakdown, host.breakdown
    assert b_dev["weights (base model)"] - b_host["weights (base model)"] == head
    host_key = "host: offloaded (not on GPU)"
    assert b_host[host_key] - b_dev[host_key] == head  # beside the offloaded layer inputs (sharding.host_memory)
    assert host.inputs["head_on_host"] and not dev.inputs["head_on_host"]
    # Where the loss is the peak phase (a large vocabulary over small layers), the streamed loss's own terms.
    import raytune_llm.kernels.cross_entropy_streamed as cs
    from raytune_llm.sharding import planner
    from raytune_llm.sharding.planner import _activation_bytes
    from raytune_llm.sharding.shapes import Shape

    wide = Shape.from_hf(
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=1_000_000)
    )
    tokens = 8192
    streamed = _activation_bytes(wide, tokens, "offload", True, fused_loss=True, streamed_head=True)[1]
    assert streamed < _activation_bytes(wide, tokens, "offload", True, fused_loss=True)[1]
    assert planner._HEAD_CHUNK_ROWS == cs.VOCAB_CHUNK  # the planner's chunk is the kernel's


def test_weights_on_device_keeps_the_state_straight(tiny_paths):
    # A CPU model, its head's "host copy" faked as the weight itself, so the logic runs without a GPU: the setters
    # are refused while the weights are borrowed, an error inside restores the state, a weight replaced since the
    # move is left alone (and no longer counted as moved), and unpatch inside leaves the weights where they are.
    from raytune_llm.models.settings import STATE_ATTR, weights_on_device

    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    lm = model.get_base_model()
    state = lm.__dict__[STATE_ATTR]
    head = lm.lm_head

    def fake_moved():
        state["head_home"], state["head_host"] = torch.device("cpu"), head.weight.data

    fake_moved()
    with weights_on_device(lm):
        assert state["head_home"] is None and state["borrowed"] == 1
        with pytest.raises(ValueError, match="cannot change while generate"):
            set_head_on_host(model, False)
    assert state["head_home"] == torch.device("cpu") and state["borrowed"] == 0
    with pytest.raises(RuntimeError, match="boom"), weights_on_device(lm):
        raise RuntimeError("boom")
    assert state["head_home"] == torch.device("cpu") and state["borrowed"] == 0
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # replaced since the move
    with weights_on_device(lm):
        pass
    assert state["head_home"] is None  # not ours any more
    fake_moved()
    with weights_on_device(lm):
        unpatch(model)
    assert STATE_ATTR not in lm.__dict__ and state["head_home"] is None


@pytest.mark.gpu
def test_head_on_host_trains_as_on_the_gpu_and_frees_the_head(tiny_paths):
    model = nf4_cuda_model(tiny_paths["llama"])
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    loss_dev, g_dev = _step(model, ids)
    head = model.get_base_model().lm_head.weight
    original = head.detach().clone()
    before = torch.cuda.memory_allocated()
    set_head_on_host(model, True)
    assert head.is_pinned() and model.raytune_patch_report.head_on_host
    assert before - torch.cuda.memory_allocated() >= head.numel() * head.element_size()
    loss_host, g_host = _step(model, ids)
    torch.testing.assert_close(loss_host, loss_dev, rtol=1e-5, atol=1e-5)
    # The loss's hidden-state gradient differs from the device path's by up to one bf16 rounding (that path rounds
    # softmax - onehot to bf16 first); carried back through the bf16 layers, the first H200 run (session 14) saw an
    # element differ by 2.2% of its tensor's largest, so the check is on each tensor's norm.
    for name in g_dev:
        diff = (g_host[name].float() - g_dev[name].float()).norm()
        assert diff <= 2e-2 * g_dev[name].float().norm() + 1e-6, name
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # no labels: the head comes back for the call
        out = model.generate(input_ids=ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert logits.is_cuda and out.shape == (1, 12) and head.is_pinned()
    set_head_on_host(model, False)
    assert head.is_cuda and torch.equal(head, original) and not model.raytune_patch_report.head_on_host
    set_head_on_host(model, True)
    unpatch(model)  # back on the device for the stock forwards
    assert head.is_cuda and "generate" not in model.get_base_model().__dict__
