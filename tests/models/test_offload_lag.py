"""`settings.set_offload_lag`: how many layers' copies to the host may be in flight under offloaded checkpointing.

The queue itself (`attention_stash.release_copied`) runs only on CUDA tensors; here its bookkeeping runs against a
stand-in stream that records what the compute stream waits for, and the layer loop's setting, the config and the
planner are checked on the CPU. On a GPU the same-bits test runs with a lag of 1, 2 and 4.
"""

from __future__ import annotations

import pytest
import torch

import raytune_llm.models.attention_stash as stash_mod
from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from tests.models.conftest import VOCAB, lora_grads, nf4_cuda_model


class _Stream:
    def __init__(self, waited: list) -> None:
        self.waited = waited

    def wait_event(self, event) -> None:
        self.waited.append(event)


@pytest.mark.parametrize("lag", [1, 2, 4])
def test_a_layer_waits_for_the_copies_of_the_layer_lag_back(monkeypatch, lag):
    waited = []
    monkeypatch.setattr(stash_mod.torch.cuda, "current_stream", lambda device=None: _Stream(waited))
    monkeypatch.setattr(stash_mod, "_copying", [])
    monkeypatch.setattr(stash_mod, "_in_flight", [])
    storage = torch.empty(1)
    for layer in range(6):  # the forward of layers 0..5: each starts by releasing, then records its copies
        stash_mod.release_copied(lag=lag)
        # what has been waited for before layer `layer` runs: the copies of layers 0 .. layer - lag
        assert waited == [f"done {i}" for i in range(max(layer - lag + 1, 0))], (layer, waited)
        stash_mod._copying.append((f"done {layer}", [storage]))
    stash_mod.release_copied(everything=True)  # backward's start: every layer's
    assert waited == [f"done {i}" for i in range(6)] and stash_mod._in_flight == []
    stash_mod.release_copied(everything=True)  # the next layers' backward: nothing more
    assert len(waited) == 6


def test_the_setting_reaches_every_checkpointed_layer_and_the_config_and_plan(tiny_paths, monkeypatch):
    import raytune_llm.models.patch as patch_mod
    from raytune_llm.config import ConfigError, load_config
    from raytune_llm.models.settings import set_offload_lag
    from raytune_llm.sharding.planner import PlanError, plan_from_values
    from raytune_llm.sharding.shapes import LLAMA31_8B

    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    seen = []
    real = patch_mod.checkpoint_layer
    monkeypatch.setattr(
        patch_mod, "checkpoint_layer", lambda fn, hidden, **kw: seen.append(kw["offload_lag"]) or real(fn, hidden, **kw)
    )
    unpatch(model)
    report = patch(model, gradient_checkpointing="offload")
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="offload_lag must be an integer >= 1"):
            set_offload_lag(model, bad)
    assert report.offload_lag == 2
    set_offload_lag(model, 3)
    assert report.offload_lag == 3
    model.train()
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [3, 3]
    with pytest.raises(ConfigError, match="offload_lag must be an integer >= 1; got 0"):
        load_config(None, ["model.offload_lag=0"])
    assert load_config(None, ["model.offload_lag=4"]).model.offload_lag == 4
    # the planner: each layer past 2 holds one more layer's input and stash on the GPU during the forward
    kw = dict(seq_len=16384, checkpointing="offload", stash_attention=True, keep_mlp_layers=6)
    held = 2 * 16384 * 4096 + 2 * 16384 * (2 * 4096 + 2 * 1024 + 4096) + 4 * 16384 * 32
    plans = [plan_from_values(LLAMA31_8B, offload_lag=n, **kw).peak_bytes for n in (1, 2, 4)]
    assert plans[0] == plans[1] and plans[2] - plans[1] == 2 * held
    # those layers are the ones just below the on-device ones when the forward ends: here GPU-kept (keep 6), so a
    # host-kept layer lower down adds nothing; with none GPU-kept and the last 2 on the device, layers 28 and 29 are
    # in flight, and 29 is host-kept (8 of range(30), every third from 29 down): its gate and up outputs too
    kw["keep_mlp_layers_on_host"] = 8
    host = [plan_from_values(LLAMA31_8B, offload_lag=n, **kw).peak_bytes for n in (2, 4)]
    assert host[1] - host[0] == 2 * held
    kw.update(keep_mlp_layers=0, last_layer_on_device=2)
    host = [plan_from_values(LLAMA31_8B, offload_lag=n, **kw).peak_bytes for n in (2, 4)]
    assert host[1] - host[0] == 2 * held + 2 * 2 * 16384 * 14336
    # with no layer on the device the newly in-flight one is still layer 29 (lag 3: the last layer waits for 29's
    # copies instead of 30's), host-kept with keep 2 (8 of range(30) again); with 4 on the device (28-31) it copies
    # nothing
    kw.update(keep_mlp_layers=2, last_layer_on_device=0)
    host = [plan_from_values(LLAMA31_8B, offload_lag=n, **kw).peak_bytes for n in (2, 3)]
    assert host[1] - host[0] == held + 2 * 2 * 16384 * 14336
    kw.update(last_layer_on_device=4)
    host = [plan_from_values(LLAMA31_8B, offload_lag=n, **kw).peak_bytes for n in (2, 3)]
    assert host[1] == host[0]
    no_ckpt = [plan_from_values(LLAMA31_8B, offload_lag=n, **dict(kw, checkpoint_layers=2)).peak_bytes for n in (2, 4)]
    assert no_ckpt[0] == no_ckpt[1]  # two checkpointed layers: no more than two in flight
    with pytest.raises(PlanError, match="offload_lag must be an int >= 1"):
        plan_from_values(LLAMA31_8B, offload_lag=0)


@pytest.mark.gpu
def test_any_lag_gives_the_same_bits_on_the_gpu(tiny_paths):
    from raytune_llm.models.settings import set_keep_mlp_layers_on_host, set_offload_lag, set_stash_attention

    model = nf4_cuda_model(tiny_paths["llama"])
    unpatch(model)
    patch(model, gradient_checkpointing="offload")
    set_stash_attention(model, True)
    set_keep_mlp_layers_on_host(model, 1)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    out = {}
    for lag in (2, 1, 4):
        set_offload_lag(model, lag)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out[lag] = (loss.detach(), lora_grads(model))
    for lag in (1, 4):
        torch.testing.assert_close(out[lag][0], out[2][0], rtol=0, atol=0)
        for name, g in out[2][1].items():
            torch.testing.assert_close(out[lag][1][name], g, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
