"""settings.set_weights_on_host: the decoder layers' base weights in host memory, each layer's brought in as it
runs (models.host_weights). On the CPU the "device" copy is a plain copy and the same code runs: the same losses
and gradients, each layer's weights fetched once in its forward and once in its checkpointed backward, which ones
stay bound after a step; on the GPU the same bits, and the layers' weights off the device between steps."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models import host_weights
from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from raytune_llm.models.settings import (
    set_dequantize_once,
    set_keep_mlp_layers,
    set_last_layer_on_device,
    set_stash_attention,
    set_weights_on_host,
)
from tests.models.conftest import VOCAB, lora_grads, nf4_cuda_model, sync_and_randomise_lora


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def _count_fetches(monkeypatch) -> list[int]:
    copies = [0]
    real = host_weights.LayerWeights.fetch

    def fetch(self):
        copies[0] += self.dev is None
        return real(self)

    monkeypatch.setattr(host_weights.LayerWeights, "fetch", fetch)
    return copies


@pytest.mark.parametrize("mode", ["offload", "on", "off"])
def test_the_same_gradients_with_each_layer_brought_in_as_it_runs(tiny_paths, monkeypatch, mode):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    sync_and_randomise_lora(model, model)
    unpatch(model)
    report = patch(model, gradient_checkpointing=mode)
    set_stash_attention(model, mode == "offload")
    model.train()
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss0, g0 = _step(model, ids)
    layers = model.get_base_model().get_decoder().layers
    bases = [host_weights.layer_base_weights(layer) for layer in layers]
    assert all(len(ps) == 7 for ps in bases)  # q, k, v, o, gate, up, down
    before = [[p.detach().clone() for p in ps] for ps in bases]
    with pytest.raises(ValueError, match="true or false"):
        set_weights_on_host(model, 1)
    set_weights_on_host(model, True)
    hw = model.get_base_model().__dict__["_raytune_patch_state"]["host_weights"]
    assert report.weights_on_host  # every base weight in its layer's buffer (aligned), the count its buffers' size
    assert report.host_weight_bytes >= sum(p.numel() * p.element_size() for ps in bases for p in ps) > 0
    fetches = _count_fetches(monkeypatch)
    loss1, g1 = _step(model, ids)
    # one copy in for each layer's forward, and one more for each checkpointed layer's backward but the last's
    # (its forward's copy stays for it). After the step layer 0's stays bound (the next forward starts with it), and
    # without checkpointing every layer's (its backward read them; nothing brings them back)
    n = len(layers)
    assert fetches[0] == (n + n - 1 if mode != "off" else n)
    for i, (w, ps) in enumerate(zip(hw, bases)):
        bound = i == 0 or mode == "off"
        buf = w.dev if bound else w.host
        assert (w.dev is not None) == bound and all(p.data.data_ptr() >= buf.data_ptr() for p in ps)
        assert all(p.data.data_ptr() < buf.data_ptr() + buf.numel() for p in ps)
    fetches[0] = 0
    _step(model, ids)
    assert fetches[0] == (2 * n - 2 if mode != "off" else 0)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    out = model.generate(
        input_ids=ids[:1, :6], max_new_tokens=3, min_new_tokens=3, do_sample=False
    )  # every layer's bound inside
    assert out.shape == (1, 9) and all(w.dev is None for w in hw)  # and all let go after
    set_weights_on_host(model, False)
    assert not report.weights_on_host and report.host_weight_bytes == 0
    for ps, old in zip(bases, before):
        for p, o in zip(ps, old):
            assert torch.equal(p, o) and all(p.data.data_ptr() != w.host.data_ptr() for w in hw)
    loss2, _ = _step(model, ids)
    torch.testing.assert_close(loss2, loss0, rtol=0, atol=0)


def test_unpatch_brings_the_weights_back(tiny_paths):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    unpatch(model)
    with pytest.raises(ValueError, match="patched by raytune_llm.patch"):
        set_weights_on_host(model, True)
    patch(model, gradient_checkpointing="offload")
    set_weights_on_host(model, True)
    hw = model.get_base_model().__dict__["_raytune_patch_state"]["host_weights"]
    unpatch(model)
    p = hw[0].params[0]
    assert not (hw[0].host.data_ptr() <= p.data.data_ptr() < hw[0].host.data_ptr() + hw[0].host.numel())


@pytest.mark.gpu
def test_on_the_gpu_the_same_bits_and_the_weights_off_the_device(tiny_paths):
    model = nf4_cuda_model(tiny_paths["llama"])
    unpatch(model)
    report = patch(model, gradient_checkpointing="offload")
    set_stash_attention(model, True)  # the e2e's settings (bench/gpu: --stash-attention --dequantize-once ...)
    set_dequantize_once(model, True)
    set_last_layer_on_device(model, True)
    set_keep_mlp_layers(model, 1)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    loss0, g0 = _step(model, ids)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    set_weights_on_host(model, True)
    hw = model.get_base_model().__dict__["_raytune_patch_state"]["host_weights"]
    assert before - torch.cuda.memory_allocated() >= sum(w.host.numel() for w in hw) * 0.9 > 0  # packed bytes left
    assert report.host_weight_bytes == sum(1 << (w.host.numel() - 1).bit_length() for w in hw)  # pinned: powers of 2
    assert all(w.host.is_pinned() for w in hw)
    loss1, g1 = _step(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert all(w.dev is None for w in hw[1:]) and hw[0].dev is not None
    out = model.generate(input_ids=ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12) and out.is_cuda


def test_the_config_setting():
    from raytune_llm.config import ConfigError, load_config

    assert load_config(None, ["model.weights_on_host=true"]).model.weights_on_host
    with pytest.raises(ConfigError, match="weights_on_host=true needs fused=true"):
        load_config(None, ["model.weights_on_host=true", "model.fused=false"])
    with pytest.raises(ConfigError, match="model.weights_on_host needs sharding.strategy ddp or auto"):
        load_config(None, ["model.weights_on_host=true", "sharding.strategy=zero3"])


@pytest.mark.gpu
def test_a_recorded_step_brings_the_weights_in_itself(tiny_paths):
    # models.graphs.CapturedStep over offloaded checkpointing with the weights on the host: the replays copy each
    # layer's weights in (from the fixed pinned buffers) and give the eager step's losses; an eager call between
    # replays (which unbinds what it binds) does not disturb them.
    from raytune_llm.models.graphs import CapturedStep

    def build(source=None):
        model = nf4_cuda_model(tiny_paths["llama"], source)  # PEFT draws lora_A from the global RNG: copy the ref's
        unpatch(model)
        patch(model, gradient_checkpointing="offload")
        set_stash_attention(model, True)
        set_dequantize_once(model, True)
        set_last_layer_on_device(model, True)
        set_keep_mlp_layers(model, 1)
        model.train()
        return model

    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    ref = build()
    want = []
    for _ in range(4):
        ref.zero_grad(set_to_none=False)
        want.append(float(ref(input_ids=ids, labels=ids).loss))
    model = build(ref)
    set_weights_on_host(model, True)
    step = CapturedStep(model)
    got = [float(step(input_ids=ids, labels=ids).loss) for _ in range(3)]
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    got.append(float(step(input_ids=ids, labels=ids).loss))
    assert step.captured and got == want


def test_a_layer_that_is_not_checkpointed_reads_in_backward_what_its_forward_read(tiny_paths):
    # Without checkpointing a layer's ops keep what they read for their backward (the dense base here, as a view of
    # the forward's copy): the host buffers overwritten between forward and backward change nothing.
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    sync_and_randomise_lora(model, model)
    unpatch(model)
    patch(model, gradient_checkpointing="off")
    model.train()
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss0, g0 = _step(model, ids)
    set_weights_on_host(model, True)
    hw = model.get_base_model().__dict__["_raytune_patch_state"]["host_weights"]
    for w in hw:
        w.unbind()  # none bound from an earlier step
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    for w in hw:
        w.host.fill_(0x7F)  # the host copies, garbage from here on
    loss.backward()
    g1 = lora_grads(model)
    torch.testing.assert_close(loss.detach(), loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_a_stock_layer_loop_is_refused(tiny_paths):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    unpatch(model)
    model.get_base_model().config.attention_dropout = 0.1  # the patch leaves the model's own layer loop
    report = patch(model, gradient_checkpointing="offload")
    assert "model" in report.stock
    with pytest.raises(ValueError, match="weights_on_host: the layer loop is stock"):
        set_weights_on_host(model, True)
