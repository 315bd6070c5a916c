"""Two trades of the patched model's memory: the input embedding in pinned host memory, and kept MLP outputs.

`settings.set_embeddings_on_host` moves a frozen input embedding to pinned host memory (the GPU gathers each
batch's rows, `kernels.embedding`); `settings.set_keep_mlp_layers` lets the last checkpointed layers keep their
MLP's gate and up outputs so their recompute skips those GEMMs. Both must leave losses and gradients as they
were. The kernels' own CPU tests (interpreter) are in tests/kernels; here the model-level rules, and on the GPU
the whole model.
"""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from raytune_llm.models.settings import set_embeddings_on_host, set_keep_mlp_layers
from tests.models.conftest import VOCAB, lora_grads, nf4_cuda_model, sync_and_randomise_lora


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def test_embeddings_on_host_refuses_what_it_cannot_serve(tiny_paths):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="true or false"):
        set_embeddings_on_host(model, "yes")
    lm = model.get_base_model()
    embed = lm.get_input_embeddings()
    embed.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen input embedding"):
        set_embeddings_on_host(model, True)
    embed.weight.requires_grad_(False)
    head = lm.lm_head.weight
    lm.lm_head.weight = embed.weight  # tied, as tie_word_embeddings makes it
    with pytest.raises(ValueError, match="tied to the LM head"):
        set_embeddings_on_host(model, True)
    lm.lm_head.weight = head
    set_embeddings_on_host(model, True)  # on a CPU model the table is on the host already: nothing moves
    assert not model.raytune_patch_report.embeddings_on_host and embed.weight.device.type == "cpu"
    unpatch(model)
    with pytest.raises(ValueError, match="patched by raytune_llm.patch"):
        set_embeddings_on_host(model, True)


def test_the_trainer_leaves_the_host_embedding_off_where_it_cannot_serve(tmp_path):
    # train/sharded.apply_host_weights: a memory saving, so a tied head, a trained embedding or DeepSpeed
    # train as without it (the worker prints why) instead of failing after the model has loaded.
    from raytune_llm.config import load_config
    from raytune_llm.models.tiny import build_tiny_model
    from raytune_llm.train.sharded import apply_host_weights

    tied = load_model(
        build_tiny_model(tmp_path / "tied", vocab_size=VOCAB, tie_word_embeddings=True),
        lora=dict(r=4, alpha=8),
        dtype=torch.float32,
        device="cpu",
    )
    on = load_config(None, ["model.embeddings_on_host=true"])
    assert "tied to the LM head" in apply_host_weights(tied, on, "ddp")
    assert apply_host_weights(tied, on, "zero2") == "embeddings_on_host: zero2 places every weight itself"
    assert apply_host_weights(tied, load_config(None, []), "ddp") is None
    untied = load_model(build_tiny_model(tmp_path / "untied", vocab_size=VOCAB), lora=dict(r=4, alpha=8), device="cpu")
    assert apply_host_weights(untied, on, "ddp") is None


def test_keep_mlp_layers_and_embeddings_on_host_settings_and_config(tiny_paths):
    from raytune_llm.config import ConfigError, load_config

    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="keep_mlp_layers must be an integer"):
            set_keep_mlp_layers(model, bad)
    set_keep_mlp_layers(model, 2)
    assert model.raytune_patch_report.keep_mlp_layers == 2
    with pytest.raises(ConfigError, match="keep_mlp_layers=2 needs gradient_checkpointing on or offload"):
        load_config(None, ["model.keep_mlp_layers=2"])
    with pytest.raises(ConfigError, match="keep_mlp_layers must be an integer >= 0"):
        load_config(None, ["model.keep_mlp_layers=-1", "model.gradient_checkpointing=on"])
    assert load_config(None, ["model.keep_mlp_layers=2", "model.gradient_checkpointing=on"]).model.keep_mlp_layers == 2
    with pytest.raises(ConfigError, match="embeddings_on_host=true needs fused=true"):
        load_config(None, ["model.embeddings_on_host=true", "model.fused=false"])
    with pytest.raises(ConfigError, match="embeddings_on_host needs sharding.strategy ddp or auto"):
        load_config(None, ["model.embeddings_on_host=true", "sharding.strategy=zero3"])
    assert load_config(None, ["model.embeddings_on_host=true"]).model.embeddings_on_host


@pytest.mark.gpu
def test_embeddings_on_host_train_and_generate_as_on_the_gpu(tiny_paths):
    model = nf4_cuda_model(tiny_paths["llama"])
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    loss_dev, g_dev = _step(model, ids)
    embed = model.get_base_model().get_input_embeddings()
    table_bytes = embed.weight.numel() * embed.weight.element_size()
    before = torch.cuda.memory_allocated()
    set_embeddings_on_host(model, True)
    assert embed.weight.is_pinned() and model.raytune_patch_report.embeddings_on_host
    assert before - torch.cuda.memory_allocated() >= table_bytes
    loss_host, g_host = _step(model, ids)
    torch.testing.assert_close(loss_host, loss_dev, rtol=0, atol=0)
    for name in g_dev:
        torch.testing.assert_close(g_host[name], g_dev[name], rtol=0, atol=0)
    with torch.no_grad():  # transformers reads the model's device off the embedding: generate brings it back
        out = model.generate(input_ids=ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12) and out.is_cuda and embed.weight.is_pinned()
    set_embeddings_on_host(model, False)
    assert embed.weight.is_cuda and not model.raytune_patch_report.embeddings_on_host
    with torch.no_grad():
        embed.weight.mul_(2)  # changed on the device: moving it back must not serve the earlier pinned copy
    set_embeddings_on_host(model, True)
    assert embed.weight.is_pinned()
    loss_again, _ = _step(model, ids)
    set_embeddings_on_host(model, False)
    loss_doubled, _ = _step(model, ids)
    torch.testing.assert_close(loss_again, loss_doubled, rtol=0, atol=0)
    assert not torch.equal(loss_again, loss_dev)
    set_embeddings_on_host(model, True)
    unpatch(model)  # back on the device for the stock forwards
    assert embed.weight.is_cuda and "generate" not in model.get_base_model().__dict__


def test_keep_mlp_layers_on_host_setting_config_and_plan(tiny_paths):
    from raytune_llm.config import ConfigError, load_config
    from raytune_llm.models.settings import set_keep_mlp_layers_on_host
    from raytune_llm.sharding.planner import PlanError, plan_from_values
    from raytune_llm.sharding.shapes import LLAMA31_8B

    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    patch(model, gradient_checkpointing="offload")
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="keep_mlp_layers_on_host must be an integer"):
            set_keep_mlp_layers_on_host(model, bad)
    set_keep_mlp_layers_on_host(model, 3)
    assert model.raytune_patch_report.keep_mlp_layers_on_host == 3
    with pytest.raises(ConfigError, match="keep_mlp_layers_on_host=2 needs gradient_checkpointing offload"):
        load_config(None, ["model.keep_mlp_layers_on_host=2", "model.gradient_checkpointing=on"])
    cfg = load_config(None, ["model.keep_mlp_layers_on_host=2", "model.gradient_checkpointing=offload"])
    assert cfg.model.keep_mlp_layers_on_host == 2
    # The planner: host bytes for the kept outputs (2 x 2 x tokens x intermediate each), and one layer's on the GPU
    # (brought back during the backward of the layer above it) unless 2 or more layers keep theirs on the GPU: those
    # are gone by then (session 16's peaks, keep 2: +0.45 GiB at 1x65536, +0.01 at 1x16384, against 3.5 and 0.9 for
    # a layer); with one, the layer above the host-kept one still holds its own
    common = dict(seq_len=2048, micro_batch=4, checkpointing="offload")
    for keep, more in ((0, 2 * 2 * 8192 * 14336), (1, 2 * 2 * 8192 * 14336), (2, 0)):
        p0 = plan_from_values(LLAMA31_8B, **common, keep_mlp_layers=keep)
        p3 = plan_from_values(LLAMA31_8B, **common, keep_mlp_layers=keep, keep_mlp_layers_on_host=3)
        assert p3.strategy == p0.strategy and p3.peak_bytes - p0.peak_bytes == more
        host = [p.breakdown.get("host: offloaded (not on GPU)", 0) for p in (p0, p3)]
        assert host[1] - host[0] == 3 * 2 * 2 * 8192 * 14336, host
    with pytest.raises(PlanError, match="keep_mlp_layers_on_host must be an int"):
        plan_from_values(LLAMA31_8B, keep_mlp_layers_on_host=-1)


def test_keep_mlp_gate_on_host_setting_config_plan_and_layers(tiny_paths, monkeypatch):
    # The gate output alone in host memory: a count >= 0, offload only, half a host-kept layer's bytes in the plan,
    # and the layer loop sends it for the layers keep_mlp_layers_on_host left (never the last one)
    import raytune_llm.models.patch as patch_mod
    from raytune_llm.config import ConfigError, load_config
    from raytune_llm.models.settings import set_keep_mlp_gate_on_host, set_keep_mlp_layers_on_host
    from raytune_llm.sharding.planner import PlanError, plan_from_values
    from raytune_llm.sharding.shapes import LLAMA31_8B

    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    seen = []
    real = patch_mod.checkpoint_layer

    def spy(fn, hidden, **kw):
        seen.append((kw["keep_mlp"], kw["keep_on_host"], kw["keep_gate_only"]))
        return real(fn, hidden, **kw)

    monkeypatch.setattr(patch_mod, "checkpoint_layer", spy)
    unpatch(model)
    report = patch(model, gradient_checkpointing="offload")
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="keep_mlp_gate_on_host must be an integer"):
            set_keep_mlp_gate_on_host(model, bad)
    set_keep_mlp_gate_on_host(model, 1)
    assert report.keep_mlp_gate_on_host == 1
    model.train()
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    _step(model, ids)
    assert seen == [(True, True, True), (False, False, False)]  # layer 0's gate; never the last layer
    seen.clear()
    set_keep_mlp_layers_on_host(model, 1)  # layer 0 keeps both: none left for the gate alone
    _step(model, ids)
    assert seen == [(True, True, False), (False, False, False)]
    with pytest.raises(ConfigError, match="keep_mlp_gate_on_host=1 needs gradient_checkpointing offload"):
        load_config(None, ["model.keep_mlp_gate_on_host=1", "model.gradient_checkpointing=on"])
    cfg = load_config(None, ["model.keep_mlp_gate_on_host=1", "model.gradient_checkpointing=offload"])
    assert cfg.model.keep_mlp_gate_on_host == 1
    common = dict(seq_len=65536, checkpointing="offload", stash_attention=True, keep_mlp_layers=2, mlp_chunk_tokens=0)
    base = plan_from_values(LLAMA31_8B, **common, keep_mlp_layers_on_host=14)
    more = plan_from_values(LLAMA31_8B, **common, keep_mlp_layers_on_host=14, keep_mlp_gate_on_host=1)
    whole = plan_from_values(LLAMA31_8B, **common, keep_mlp_layers_on_host=15)
    host = [p.breakdown["host: offloaded (not on GPU)"] for p in (base, more, whole)]
    assert host[1] - host[0] == 2 * 65536 * 14336 == (host[2] - host[0]) / 2  # 1.75 GiB, half a layer's
    assert more.peak_bytes == base.peak_bytes  # with 2 GPU-kept layers its return is not at the peak
    with pytest.raises(PlanError, match="keep_mlp_gate_on_host must be an int"):
        plan_from_values(LLAMA31_8B, keep_mlp_gate_on_host=-1)


@pytest.mark.parametrize(
    "mode,keep,on_host,lastdev,want",
    [
        ("offload", 1, 1, False, [(True, True), (True, False)]),  # layer 0 below the GPU-kept last one
        (
            "offload",
            0,
            2,
            False,
            [(True, True), (False, False)],
        ),  # never the last layer (its copies come straight back)
        ("offload", 0, 2, True, [(True, True), (False, False)]),
        ("on", 0, 2, False, [(False, False), (False, False)]),  # offload only
    ],
)
def test_the_layer_loop_sends_the_chosen_layers_outputs_to_the_host(
    tiny_paths, monkeypatch, mode, keep, on_host, lastdev, want
):
    # Which layers keep their MLP outputs, and where (the kept tensors' round trip is proved in
    # tests/kernels/test_lora.py; on the GPU, tests below): (keep_mlp, keep_on_host) per checkpoint_layer call.
    import raytune_llm.models.patch as patch_mod
    from raytune_llm.models.settings import set_keep_mlp_layers_on_host, set_last_layer_on_device

    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    seen = []
    real = patch_mod.checkpoint_layer

    def spy(fn, hidden, **kw):
        seen.append((kw["keep_mlp"], kw["keep_on_host"]))
        return real(fn, hidden, **kw)

    monkeypatch.setattr(patch_mod, "checkpoint_layer", spy)
    unpatch(model)
    patch(model, gradient_checkpointing=mode)
    set_keep_mlp_layers(model, keep)
    set_keep_mlp_layers_on_host(model, on_host)
    set_last_layer_on_device(model, lastdev)
    model.train()
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    _step(model, ids)
    assert seen == want


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["on", "offload", "offload-host", "offload-gate"])
def test_kept_mlp_layers_give_the_same_gradients_and_skip_the_gemms(tiny_paths, monkeypatch, mode):
    import raytune_llm.kernels.lora as lora_mod
    from raytune_llm.models.settings import set_dequantize_once, set_stash_attention

    model = nf4_cuda_model(tiny_paths["llama"])
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    n_layers = model.get_base_model().config.num_hidden_layers
    calls = [0]
    real = lora_mod.nf4_dequantize
    monkeypatch.setattr(lora_mod, "nf4_dequantize", lambda w, dt: calls.__setitem__(0, calls[0] + 1) or real(w, dt))

    # offload-host: the last layer's kept on the GPU, every other layer's in host memory; offload-gate: the others'
    # gate output alone there (their recompute runs the up GEMM, the backward kernel finishes it)
    host, gate = mode == "offload-host", mode == "offload-gate"

    def run(keep):
        from raytune_llm.models.settings import set_keep_mlp_gate_on_host, set_keep_mlp_layers_on_host

        unpatch(model)
        report = patch(model, gradient_checkpointing=mode.split("-")[0])
        set_dequantize_once(model, False)  # with it the recompute's gate/up copies serve backward: counts level
        set_stash_attention(model, mode != "on")
        set_keep_mlp_layers(model, min(keep, 1) if host or gate else keep)
        set_keep_mlp_layers_on_host(model, keep if host else 0)
        set_keep_mlp_gate_on_host(model, keep if gate else 0)
        assert report.keep_mlp_layers == (min(keep, 1) if host or gate else keep)
        calls[0] = 0
        return (*_step(model, ids), calls[0])

    loss0, g0, n0 = run(0)
    loss1, g1, n1 = run(n_layers + 3)  # more than there are layers: every layer
    # each layer's recompute dequantized gate and up; kept, it does not (gate alone kept: up's still)
    assert n0 - n1 == (n_layers + 1 if gate else 2 * n_layers)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_last_layer_on_device_gives_the_same_bits(tiny_paths, device):
    from raytune_llm.models.settings import set_last_layer_on_device, set_stash_attention

    dtype, quantize = (torch.float32, None) if device == "cpu" else (torch.bfloat16, "nf4")
    model = load_model(tiny_paths["llama"], quantize=quantize, lora=dict(r=4, alpha=8), dtype=dtype, device=device)
    sync_and_randomise_lora(model, model)
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    unpatch(model)
    report = patch(model, gradient_checkpointing="offload")
    set_stash_attention(model, True)
    for bad in (-1, "yes", 1.0):
        with pytest.raises(ValueError, match="true, false or a layer count"):
            set_last_layer_on_device(model, bad)
    import raytune_llm.models.attention_stash as stash_mod

    copies = [0]
    real = stash_mod.HostCopies._to_host

    def counted(self, raw):
        copies[0] += 1
        return real(self, raw)

    stash_mod.HostCopies._to_host = counted
    try:
        loss0, g0 = _step(model, ids)
        made_off, copies[0] = copies[0], 0
        set_last_layer_on_device(model, True)
        assert report.last_layer_on_device
        loss1, g1 = _step(model, ids)
        made_on = copies[0]
    finally:
        stash_mod.HostCopies._to_host = real
    n_layers = model.get_base_model().config.num_hidden_layers
    assert made_off > 0 and made_off % n_layers == 0  # every layer copied to the host, as many each
    assert made_on == made_off - made_off // n_layers  # now the last layer copied nothing
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_last_layers_on_device_copy_nothing_and_give_the_same_bits(tmp_path, monkeypatch, device):
    # last_layer_on_device N on four layers: the last N (never layer 0) keep input and stash on the device, the same
    # bits; host-kept MLP layers skip them (the kept outputs' round trip: tests/kernels/test_lora.py)
    import raytune_llm.models.attention_stash as stash_mod
    import raytune_llm.models.patch as patch_mod
    from raytune_llm.models.settings import (
        set_keep_mlp_layers_on_host,
        set_last_layer_on_device,
        set_stash_attention,
    )
    from raytune_llm.models.tiny import build_tiny_model
    from raytune_llm.sharding.host_memory import device_layers, host_kept_count
    from raytune_llm.sharding.shapes import Shape

    path = build_tiny_model(tmp_path / "four", vocab_size=VOCAB, num_hidden_layers=4)
    dtype, quantize = (torch.float32, None) if device == "cpu" else (torch.bfloat16, "nf4")
    model = load_model(path, quantize=quantize, lora=dict(r=4, alpha=8), dtype=dtype, device=device)
    sync_and_randomise_lora(model, model)
    unpatch(model)
    report = patch(model, gradient_checkpointing="offload")
    set_stash_attention(model, True)
    # the kernels' MLP (CUDA, or the interpreter's) keeps outputs: host-kept layers would copy them too
    from raytune_llm.kernels._dispatch import use_triton

    n_host = 0 if use_triton(torch.empty(0, device=device)) else 3
    set_keep_mlp_layers_on_host(model, n_host)
    copies, seen = [0], []
    real_copy, real_ckpt = stash_mod.HostCopies._to_host, patch_mod.checkpoint_layer
    monkeypatch.setattr(
        stash_mod.HostCopies, "_to_host", lambda self, raw: copies.__setitem__(0, copies[0] + 1) or real_copy(self, raw)
    )

    def spy(fn, hidden, **kw):
        seen.append((kw["on_device"], kw["keep_on_host"]))
        return real_ckpt(fn, hidden, **kw)

    monkeypatch.setattr(patch_mod, "checkpoint_layer", spy)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    runs = {}
    for n in (0, True, 2, 3, 9):
        set_last_layer_on_device(model, n)
        assert report.last_layer_on_device == n
        copies[0], seen[:] = 0, []
        runs[n] = (*_step(model, ids), copies[0], list(seen))
    loss0, g0, made0, _ = runs[0]
    assert made0 > 0 and made0 % 4 == 0  # each layer copies its input and stash, as many each
    per_layer = made0 // 4
    for n, want_dev in ((True, 1), (2, 2), (3, 3), (9, 3)):
        loss, g, made, where = runs[n]
        assert [d for d, _ in where] == [i >= 4 - want_dev for i in range(4)]
        assert made == (4 - want_dev) * per_layer, (n, made, made0)  # an on-device layer copies nothing
        on_host = {i for i, (_, h) in enumerate(where) if h}
        assert on_host == set(range(min(n_host, 4 - want_dev))), (n, on_host)  # below the on-device layers
        # sharding.host_memory's mirror of this choice (it may not import models) counts the same layers
        shape = Shape.from_hf(model.get_base_model().config.to_dict())
        assert device_layers(shape, None, n) == want_dev and host_kept_count(shape, None, 0, n_host, n) == len(on_host)
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
        for name in g0:
            torch.testing.assert_close(g[name], g0[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
