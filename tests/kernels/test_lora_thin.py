"""kernels.lora_thin: a checkpointed layer's recompute takes the adapters' X A^T its forward formed, the same bits."""

from __future__ import annotations

import pytest
import torch

from tests.kernels._tolerance import needs_triton, patched_step, tiny_bf16_llama


@needs_triton
@pytest.mark.parametrize("mode,stash", [("offload", True), ("on", False)])
def test_the_recompute_reuses_the_forwards_thin_products_with_the_same_bits(tmp_path, monkeypatch, mode, stash):
    import contextlib

    import raytune_llm.kernels.lora_thin as thin
    import raytune_llm.models.checkpointing as ckpt

    model, ids = tiny_bf16_llama(tmp_path)
    formed = {"forward": 0, "recompute": 0}
    real = thin.thin_product

    def counting(X, A, key):
        # a product formed (not handed back) runs `X @ A.t()`: count them by phase
        store = thin._reuse[-1] if thin._reuse else {}
        before = sum(len(v[1]) for v in store.values())
        out = real(X, A, key)
        if sum(len(v[1]) for v in store.values()) == before:
            formed["recompute" if thin._reuse else "forward"] += 1
        return out

    monkeypatch.setattr("raytune_llm.kernels.lora.thin_product", counting)
    with monkeypatch.context() as m:  # the forward keeps nothing: the recompute forms every product again
        m.setattr(ckpt, "keep_thin_products", lambda store: contextlib.nullcontext())
        loss0, g0 = patched_step(model, ids, mode, stash)
    n0 = dict(formed)
    formed.update(forward=0, recompute=0)
    loss1, g1 = patched_step(model, ids, mode, stash)
    n1 = dict(formed)
    assert not thin._keep and not thin._reuse, "a block was left open"
    layers = model.get_base_model().config.num_hidden_layers
    # the forward forms Q/K/V's, O's and gate/up's products in every layer; the recompute forms them all again
    # without the keep, but for O's in a replayed stash; with it, none
    assert n0["forward"] == n1["forward"] == 3 * layers
    assert n0["recompute"] == (2 if stash else 3) * layers and n1["recompute"] == 0
    assert torch.equal(loss1, loss0)
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name


def test_a_kept_product_that_does_not_fit_is_an_error():
    from raytune_llm.kernels.lora_thin import keep_thin_products, reuse_thin_products, thin_product

    X, A = torch.randn(5, 8), torch.randn(3, 8)
    store: dict = {}
    with torch.no_grad(), keep_thin_products(store):
        kept = thin_product(X, A, A)
    assert list(store) == [id(A)] and store[id(A)][0] is A and store[id(A)][1] == [kept]
    with reuse_thin_products(store):
        assert thin_product(X, A, A) is kept  # handed back, not formed again
        assert torch.equal(thin_product(X, A, A), X @ A.t())  # the store is used up: formed
    store = {id(A): (A, [torch.zeros(4, 3)])}
    with reuse_thin_products(store), pytest.raises(RuntimeError, match="does not match this call"):
        thin_product(X, A, A)


def test_another_tensor_at_the_keys_id_or_a_dropped_store_forms_the_product():
    # an entry is the key's only: a tensor at the same id (the key freed, its address reused) takes nothing; a store
    # dropped after the first backward (None: a second backward through a retained graph) forms every product
    from raytune_llm.kernels.lora_thin import reuse_thin_products, thin_product

    X, A, other = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3, 8)
    wrong = torch.zeros(5, 3)
    with reuse_thin_products({id(A): (other, [wrong])}):
        assert torch.equal(thin_product(X, A, A), X @ A.t())
    with reuse_thin_products(None):
        assert torch.equal(thin_product(X, A, A), X @ A.t())
