"""The decoder layer with its residual adds inside the RMSNorm kernels (`settings.set_fused_residuals`).

The layer runs ``h = x + attn(norm1(x))`` then ``out = h + mlp(norm2(h))``; fused, the first add and norm2 are one
kernel each way, x's two gradients are summed inside norm1's backward, and a recompute's last add keeps no values.
None of that may move a bit of the loss or of any gradient. On the CPU (reference kernels) this proves the layer
plumbing and the value-less add under every checkpointing mode; the kernels' own bit-for-bit tests run under the
interpreter (tests/kernels/test_rms_norm.py); on the GPU the whole model in bf16 NF4.
"""

from __future__ import annotations

import pytest
import torch

import raytune_llm.models.checkpointing as ckpt
from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from raytune_llm.models.settings import set_fused_residuals, set_stash_attention
from tests.models.conftest import VOCAB, lora_grads, nf4_cuda_model, sync_and_randomise_lora


def _count_valueless(monkeypatch) -> list[int]:
    calls = [0]
    real = ckpt._SumWithoutValues.apply
    monkeypatch.setattr(ckpt._SumWithoutValues, "apply", lambda *a: calls.__setitem__(0, calls[0] + 1) or real(*a))
    return calls


def _run(model, ids, mode: str, fused: bool, **settings):
    from raytune_llm.models import settings as S

    unpatch(model)
    report = patch(model, gradient_checkpointing=mode)
    set_stash_attention(model, mode == "offload")
    for name, value in settings.items():
        getattr(S, f"set_{name}")(model, value)
    set_fused_residuals(model, fused)
    n_layers = model.get_base_model().config.num_hidden_layers
    assert sum("residual adds inside the norms" in r for r in report.replaced) == n_layers
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["off", "on", "offload"])
def test_fused_residuals_leave_loss_and_gradients_bit_for_bit(tiny_paths, monkeypatch, family, mode):
    model = load_model(tiny_paths[family], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    sync_and_randomise_lora(model, model)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = _count_valueless(monkeypatch)
    loss0, g0 = _run(model, ids, mode, fused=False)
    assert calls[0] == 0
    loss1, g1 = _run(model, ids, mode, fused=True)
    n_layers = model.get_base_model().config.num_hidden_layers
    assert calls[0] == (0 if mode == "off" else n_layers)  # each recompute's last add, and only those
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_set_fused_residuals_refuses_non_bools(tiny_paths):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    patch(model)
    with pytest.raises(ValueError, match="fused_residuals must be true or false"):
        set_fused_residuals(model, "yes")


def test_the_value_less_add_serves_only_a_recompute():
    h = torch.randn(2, 3, requires_grad=True)
    m = torch.randn(2, 3, requires_grad=True)
    assert torch.equal(ckpt.residual_add(h, m), h + m)  # outside a recompute: the sum
    with ckpt._recompute():
        out = ckpt.residual_add(h, m)
    assert out.shape == h.shape and out.stride() == (0, 0)  # no values, and no memory for them
    assert not out.any()  # a view of one zero, should anything read it
    with ckpt._recompute():
        mixed = ckpt.residual_add(h, m.double())  # promotion: the plain add
    assert mixed.dtype == torch.float64 and mixed.stride() == (3, 1)
    g = torch.randn(2, 3)
    torch.autograd.backward(out, g)
    assert torch.equal(h.grad, g) and torch.equal(m.grad, g)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["off", "on", "offload"])
def test_fused_residuals_on_the_gpu_bit_for_bit(tiny_paths, monkeypatch, family, mode):
    import raytune_llm.kernels.rms_norm as rms_mod

    model = nf4_cuda_model(tiny_paths[family])
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    fused_calls = [0]
    real = rms_mod.ResidualRMSNormFunction.apply
    monkeypatch.setattr(
        rms_mod.ResidualRMSNormFunction, "apply", lambda *a: fused_calls.__setitem__(0, fused_calls[0] + 1) or real(*a)
    )
    valueless = _count_valueless(monkeypatch)
    settings = dict(dequantize_once=mode != "off", keep_mlp_layers=1) if mode != "off" else {}
    loss0, g0 = _run(model, ids, mode, fused=False, **settings)
    assert fused_calls[0] == 0 and valueless[0] == 0
    loss1, g1 = _run(model, ids, mode, fused=True, **settings)
    n_layers = model.get_base_model().config.num_hidden_layers
    runs = 1 if mode == "off" else 2  # a checkpointed layer runs its forward twice
    assert fused_calls[0] == 2 * n_layers * runs  # two norms a layer, in the bf16 kernels
    assert valueless[0] == (0 if mode == "off" else n_layers)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
