"""Per-layer activation checkpointing (and its host offload) gives the gradients of the plain run."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from tests.models.conftest import VOCAB, lora_grads, sync_and_randomise_lora


def _graph_has(fn, name: str) -> bool:
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == name:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def _grads(model, mode: str, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    unpatch(model)
    report = patch(model, gradient_checkpointing=mode)
    assert report.gradient_checkpointing == mode
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # LoRA dropout draws the same masks in each run
    loss = model(input_ids=ids, labels=ids).loss
    assert _graph_has(loss.grad_fn, "_CheckpointFunctionBackward") == (mode != "off")
    loss.backward()
    return loss.detach(), lora_grads(model)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_and_offloaded_gradients_equal_plain(tiny_paths, dropout, device):
    lora = dict(r=4, alpha=8, dropout=dropout)
    model = load_model(tiny_paths["llama"], lora=lora, dtype=torch.float32, device=device)
    sync_and_randomise_lora(model, model)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    loss_off, g_off = _grads(model, "off", ids, seed=7)
    for mode in ("on", "offload"):
        loss, g = _grads(model, mode, ids, seed=7)
        # Bitwise on the CPU; on CUDA the Triton backward may accumulate in another order.
        exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_off, **exact)
        assert g.keys() == g_off.keys()
        for name in g_off:
            # Layer 0's input comes from frozen embeddings: its LoRA grads must still arrive.
            assert g[name].abs().sum() > 0, f"{mode}: no gradient for {name}"
            torch.testing.assert_close(
                g[name], g_off[name], rtol=1e-5, atol=1e-6, msg=lambda m, mode=mode, name=name: f"{mode} {name}: {m}"
            )


def test_bad_mode_is_a_clear_error(tiny_paths):
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of"):
        load_model(tiny_paths["llama"], gradient_checkpointing="yes", dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_selective_checkpointing_recomputes_only_the_first_layers(tiny_paths, mode):
    from raytune_llm.models.settings import set_checkpoint_layers

    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8, dropout=0.0), dtype=torch.float32, device="cpu")
    sync_and_randomise_lora(model, model)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss_off, g_off = _grads(model, "off", ids, seed=7)
    layers = model.get_base_model().model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    for n in (0, 1, len(layers)):
        unpatch(model)
        report = patch(model, gradient_checkpointing=mode)
        set_checkpoint_layers(model, n)
        assert report.checkpoint_layers == n
        calls[:] = [0] * len(layers)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # A checkpointed layer runs twice (forward, then again in backward); the others once.
        assert calls == [2 if i < n else 1 for i in range(len(layers))], (n, calls)
        torch.testing.assert_close(loss.detach(), loss_off, rtol=0, atol=0)
        g = lora_grads(model)
        for name in g_off:
            torch.testing.assert_close(g[name], g_off[name], rtol=1e-5, atol=1e-6)


def test_checkpoint_layers_needs_checkpointing_and_a_valid_count(tiny_paths):
    from raytune_llm.config import ConfigError, load_config
    from raytune_llm.models.settings import set_checkpoint_layers

    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="checkpoint_layers"):
            set_checkpoint_layers(model, bad)
    with pytest.raises(ConfigError, match="checkpoint_layers=2 needs gradient_checkpointing"):
        load_config(None, ["model.checkpoint_layers=2"])
    with pytest.raises(ConfigError, match="dequantize_once=true needs gradient_checkpointing"):
        load_config(None, ["model.dequantize_once=true"])
    assert load_config(None, ["model.dequantize_once=true", "model.gradient_checkpointing=on"]).model.dequantize_once
    cfg = load_config(None, ["model.checkpoint_layers=2", "model.gradient_checkpointing=on"])
    assert cfg.model.checkpoint_layers == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("o_proj", [True, False], ids=["with_o", "attention_only"])
def test_stashed_attention_is_replayed_not_recomputed_with_the_same_gradients(
    tiny_paths, monkeypatch, device, family, packed, o_proj
):
    # Offloaded checkpointing with stash_attention: the forward keeps each layer's attention in host memory and
    # the recompute replays it, so attention runs once per layer instead of twice; the gradients are those of the
    # plain run (on the CPU bit for bit, the same backward on the same saved tensors). Packed rows take flash
    # varlen on CUDA (stashed) and a dense mask on the CPU (recomputed); Qwen3's q/k norm keeps the Q/K/V GEMMs in
    # the recompute (it reads their values). With o_proj the replayed block ends after the O projection, which the
    # recompute then skips as well, and its adapter's gradients come from the replay.
    import raytune_llm.kernels.lora as lora_mod
    import raytune_llm.models.patch as patch_mod
    from raytune_llm.models.settings import set_stash_attention

    if family not in tiny_paths:
        pytest.skip(f"no tiny {family}")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_model(tiny_paths[family], lora=dict(r=4, alpha=8, dropout=0.0), dtype=dtype, device=device)
    sync_and_randomise_lora(model, model)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    kw = {}
    if packed:  # row 0: documents of 10 and 14 tokens; row 1: one of 24
        kw["position_ids"] = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1).to(device)
        kw["position_ids"][1] = torch.arange(24)
    calls = [0]
    real = patch_mod.causal_attention
    monkeypatch.setattr(
        patch_mod, "causal_attention", lambda *a, **k: calls.__setitem__(0, calls[0] + 1) or real(*a, **k)
    )
    o_calls = [0]
    real_o = lora_mod.lora_linear
    monkeypatch.setattr(
        lora_mod, "lora_linear", lambda *a, **k: o_calls.__setitem__(0, o_calls[0] + 1) or real_o(*a, **k)
    )
    n_layers = model.get_base_model().config.num_hidden_layers

    def grads(mode, stash):
        unpatch(model)
        report = patch(model, gradient_checkpointing=mode)
        set_stash_attention(model, stash, o_proj=o_proj)
        assert (report.stash_attention, report.stash_o_proj) == (stash, o_proj)
        model.zero_grad(set_to_none=True)
        calls[0] = o_calls[0] = 0
        loss = model(input_ids=ids, labels=ids, **kw).loss
        loss.backward()
        return loss.detach(), lora_grads(model), (calls[0], o_calls[0])

    loss_off, g_off, n_off = grads("off", False)
    loss_full, g_full, n_full = grads("offload", False)
    loss, g, n = grads("offload", True)
    # Packed rows on the CPU take the dense-mask path, which is not stashed (the mask would be copied per layer).
    stashed = not packed or device == "cuda"
    once, twice = n_layers, 2 * n_layers
    assert (n_off, n_full) == ((once, once), (twice, twice))
    assert n == (once if stashed else twice, once if stashed and o_proj else twice)
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss, loss_off, **exact)
    for name in g_off:
        assert g[name].abs().sum() > 0, f"no gradient for {name}"
        # The stash against the whole recompute: the same backward on the same tensors.
        torch.testing.assert_close(g[name], g_full[name], **exact, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(g[name], g_off[name], **exact, msg=lambda m, name=name: f"{name}: {m}")


def test_stash_attention_needs_offload_and_a_bool(tiny_paths):
    from raytune_llm.config import ConfigError, load_config
    from raytune_llm.models.settings import set_stash_attention

    with pytest.raises(ConfigError, match="stash_attention=true needs gradient_checkpointing offload"):
        load_config(None, ["model.stash_attention=true", "model.gradient_checkpointing=on"])
    cfg = load_config(None, ["model.stash_attention=true", "model.gradient_checkpointing=offload"])
    assert cfg.model.stash_attention
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8))
    with pytest.raises(ValueError, match="stash_attention must be true or false"):
        set_stash_attention(model, "yes")
