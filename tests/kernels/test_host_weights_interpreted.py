"""models.host_weights through the Triton ops (the interpreter here, as on the GPU), where the fused ops keep the
base weight they were handed for their backward: a layer whose weights went back to the host after its forward must
not be read there in its backward, and the attention stash's kept O projection must not hold the layer's device
copy until then. (tests/models/test_host_weights.py: the same settings through the torch references.)"""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from raytune_llm.models.settings import set_stash_attention, set_weights_on_host
from raytune_llm.models.tiny import build_tiny_model
from tests.kernels._tolerance import needs_triton

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", family="llama", vocab_size=VOCAB, seed=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _model(path, mode, ids):
    """The model, its gradients with the weights on the device, and then the weights on the host, none bound."""
    model = load_model(path, lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    unpatch(model)
    patch(model, gradient_checkpointing=mode)
    set_stash_attention(model, mode == "offload")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    want = _grads(model)
    set_weights_on_host(model, True)
    hw = model.get_base_model().__dict__["_raytune_patch_state"]["host_weights"]
    for w in hw:
        w.unbind()
    model.zero_grad(set_to_none=True)
    return model, want, hw


def _same(got, want):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@needs_triton
def test_backward_never_reads_the_host_copy_of_a_layer_it_did_not_bring_back(tiny_llama):
    # No checkpointing: nothing brings a layer's weights back for its backward, which reads what its forward read.
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model, want, hw = _model(tiny_llama, "off", ids)
    loss = model(input_ids=ids, labels=ids).loss
    for w in hw:
        w.host.fill_(0x7F)  # garbage from here on
    loss.backward()
    _same(_grads(model), want)


@needs_triton
def test_the_stashed_o_projection_does_not_hold_the_layers_device_copy(tiny_llama, monkeypatch):
    # Offloaded checkpointing with the O projection in the kept attention block: after the forward, the device copy
    # of every layer but the last is gone (the kept O projection reads the weight again in its backward), and the
    # gradients are those with the weights on the device.
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model, want, hw = _model(tiny_llama, "offload", ids)
    made = []
    real_fetch = type(hw[0]).fetch

    def fetch(self):
        fresh = self.dev is None
        real_fetch(self)
        if fresh:
            made.append((hw.index(self), StorageWeakRef(self.dev.untyped_storage())))

    monkeypatch.setattr(type(hw[0]), "fetch", fetch)
    loss = model(input_ids=ids, labels=ids).loss
    alive = [i for i, ref in made if not ref.expired()]
    assert alive == [len(hw) - 1], alive  # only the last layer's, whose backward comes first
    loss.backward()
    _same(_grads(model), want)
