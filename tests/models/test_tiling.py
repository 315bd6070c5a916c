"""The MLP split over the sequence (models/tiling.py): the untiled numbers, without the [tokens, I] tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import raytune_llm.models.patch as patch_module
from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from raytune_llm.models.settings import set_mlp_chunk_tokens
from raytune_llm.models.tiling import AUTO_BYTES, check_chunk_tokens, chunk_tokens_for, tiled_over_tokens
from raytune_llm.sharding.planner import LLAMA31_8B, LLAMA31_70B, mlp_chunk_rows
from tests.models.conftest import VOCAB, lora_grads, sync_and_randomise_lora

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 48  # 2 rows x 24
CHUNKS = (5, 7, 16, 1000)  # 5 and 7 do not divide 48; 1000 is one chunk larger than the batch
LOSS_TOL = dict(rtol=1e-6, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)  # per-token contributions summed chunk by chunk: another order


def _batch(packed: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # three examples per row, positions restarting at 0
        pos = torch.cat([torch.arange(10), torch.arange(8), torch.arange(6)])
        batch["position_ids"] = pos[None].expand(2, -1).contiguous()
        labels[:, [10, 18]] = -100
    return batch


def _run(model, batch, mode: str, chunk):
    unpatch(model)
    report = patch(model, gradient_checkpointing=mode, mlp_chunk_tokens=chunk)
    assert report.mlp_chunk_tokens == chunk
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def _counting(monkeypatch) -> list:
    calls = []

    def spy(fn, x, chunk_tokens, params=()):
        calls.append(chunk_tokens)
        return tiled_over_tokens(fn, x, chunk_tokens, params)

    monkeypatch.setattr(patch_module, "tiled_over_tokens", spy)
    return calls


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiled_equals_untiled_for_every_chunk_and_checkpointing_mode(tiny_paths, family, quantize, monkeypatch):
    model = load_model(
        tiny_paths[family], quantize=quantize, lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu"
    )
    assert model.raytune_patch_report.stock == {}
    sync_and_randomise_lora(model, model)
    calls = _counting(monkeypatch)
    for packed in (False, True):
        batch = _batch(packed)
        calls.clear()
        loss_ref, g_ref = _run(model, batch, "off", None)
        assert not calls
        for mode in ("off", "on", "offload"):
            for chunk in CHUNKS:
                calls.clear()
                loss, g = _run(model, batch, mode, chunk)
                assert calls and set(calls) == {chunk}  # every MLP call went through the tiled function
                where = f"{family} {quantize} packed={packed} {mode} chunk={chunk}"
                torch.testing.assert_close(loss, loss_ref, **LOSS_TOL, msg=lambda m, w=where: f"{w} loss: {m}")
                assert g.keys() == g_ref.keys()
                for name in g_ref:
                    assert g[name].abs().sum() > 0, f"{where}: no gradient for {name}"
                    torch.testing.assert_close(
                        g[name], g_ref[name], **GRAD_TOL, msg=lambda m, w=where, n=name: f"{w} {n}: {m}"
                    )


def test_mlp_only_adapters_get_gradients_when_the_mlp_input_needs_none(tiny_paths):
    # LoRA on the MLP alone and no checkpointing: layer 0's MLP input comes from frozen embeddings and
    # frozen attention, so only the parameters keep the tiled output in the graph.
    lora = dict(r=4, alpha=8, target_modules=["gate", "up", "down"])
    model = load_model(tiny_paths["llama"], lora=lora, dtype=torch.float32, device="cpu")
    sync_and_randomise_lora(model, model)
    batch = _batch(packed=True)
    loss_ref, g_ref = _run(model, batch, "off", None)
    loss, g = _run(model, batch, "off", 7)
    torch.testing.assert_close(loss, loss_ref, **LOSS_TOL)
    for name in g_ref:
        assert g[name].abs().sum() > 0, name
        torch.testing.assert_close(g[name], g_ref[name], **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


def _mlp_activations(model, run) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd saves while `run()` executes whose last dim is the MLP width (weights,
    which share a parameter's storage, left out)."""
    width = model.config.intermediate_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == width and t.untyped_storage().data_ptr() not in weights:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return shapes


def _rows(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape[:-1]).numel())


def test_tiled_forward_saves_no_tokens_by_intermediate_tensor(tiny_paths):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    batch = _batch(packed=False)
    for chunk in (None, 7):
        for mode in ("off", "on"):
            unpatch(model)
            patch(model, gradient_checkpointing=mode, mlp_chunk_tokens=chunk)
            out = {}
            fwd = _mlp_activations(model, lambda out=out: out.setdefault("loss", model(**batch).loss))
            bwd = _mlp_activations(model, lambda out=out: out["loss"].backward())
            if chunk is None and mode == "off":
                # measured: both layers' MLPs keep [2, 24, I] and [48, I] tensors from forward to backward
                assert fwd and max(map(_rows, fwd)) == TOKENS
            elif chunk is None:
                # checkpointed: nothing in forward, the recomputed layer saves whole-sequence tensors in backward
                assert not fwd and max(map(_rows, bwd)) == TOKENS
            else:
                # tiled: nothing [·, I] kept from forward; in backward one chunk's worth at a time
                assert not fwd, fwd
                assert bwd and max(map(_rows, bwd)) == chunk, bwd


def test_auto_rule():
    # Llama-3.1-8B's MLP width in bf16: chunks of 37,440 tokens ([37440, 14336] bf16 <= 1 GiB, 64-row multiple)
    assert chunk_tokens_for("auto", 37_440, 14336, 2) is None
    assert chunk_tokens_for("auto", 16_384, 14336, 2) is None  # the benchmarked lengths stay untiled
    for tokens in (37_441, 65_536, 400_000):
        assert chunk_tokens_for("auto", tokens, 14336, 2) == 37_440
    assert 37_440 * 14336 * 2 <= AUTO_BYTES < 37_504 * 14336 * 2
    assert chunk_tokens_for("auto", 20_000, 28672, 2) == 18_688  # 70B width
    assert chunk_tokens_for("auto", 4096, 128, 4) is None  # tiny models never tile by default
    assert chunk_tokens_for(0, 10**6, 14336, 2) is None and chunk_tokens_for(None, 10**6, 14336, 2) is None
    assert chunk_tokens_for(512, 100, 14336, 2) == 512


def test_planner_mirrors_the_auto_rule():
    for cfg in (LLAMA31_8B, LLAMA31_70B):
        width = cfg["intermediate_size"]
        for tokens in (1, 2048, 18_688, 18_689, 37_440, 37_441, 65_536, 131_072, 400_001, 10**6):
            for setting in ("auto", None, 0, 1000):
                for size in (2, 4):  # bf16 and fp32 elements
                    assert mlp_chunk_rows(width, tokens, setting, size) == chunk_tokens_for(
                        setting, tokens, width, size
                    )


@pytest.mark.parametrize("bad", [-1, 1.5, "yes", True])
def test_bad_settings_are_clear_errors(tiny_paths, bad):
    with pytest.raises(ValueError, match="mlp_chunk_tokens must be"):
        check_chunk_tokens(bad)
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="mlp_chunk_tokens must be"):
        set_mlp_chunk_tokens(model, bad)
    unpatch(model)
    with pytest.raises(ValueError, match="mlp_chunk_tokens must be"):
        patch(model, mlp_chunk_tokens=bad)
    with pytest.raises(ValueError, match="needs a model patched"):
        set_mlp_chunk_tokens(model, 16)


def test_set_mlp_chunk_tokens_takes_effect_on_the_next_call(tiny_paths, monkeypatch):
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    assert model.raytune_patch_report.mlp_chunk_tokens == "auto"
    calls = _counting(monkeypatch)
    batch = _batch(packed=False)
    model(**batch)
    assert not calls  # "auto" leaves 48 tokens untiled
    set_mlp_chunk_tokens(model, 16)
    assert model.raytune_patch_report.mlp_chunk_tokens == 16
    model(**batch)
    assert calls == [16, 16]  # one call per layer


_ZERO_SCRIPT = """
import sys, torch
import torch.distributed as dist
from raytune_llm.models.load import load_model
from raytune_llm.models.settings import set_mlp_chunk_tokens
from raytune_llm.sharding.engine import wrap_model
from raytune_llm.sharding.zero import build_zero_config
from deepspeed.utils import safe_get_full_grad
from tests.models.conftest import sync_and_randomise_lora
from tests.models.test_tiling import _batch

path, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + out + ".pg", rank=0, world_size=1)
results = {}
for stage in (2, 3):
    for chunk in (None, 7):
        torch.manual_seed(0)
        model = load_model(path, lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
        sync_and_randomise_lora(model, model)
        set_mlp_chunk_tokens(model, chunk)
        cfg = build_zero_config(stage, micro_batch=2, grad_accum=1, dtype="fp32", grad_clip=0.0, lr=1e-2, world_size=1)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the LoRA factors
        sharded = wrap_model(model, f"zero{stage}", cfg, dtype="fp32", device=torch.device("cpu"))
        for step in range(2):
            loss = sharded.wrapped(**_batch(packed=True)).loss
            sharded.wrapped.backward(loss)
            grads = {n: safe_get_full_grad(p).clone() for n, p in sharded.module.named_parameters() if p.requires_grad}
            results[(stage, chunk, step)] = (loss.detach(), grads)
            sharded.wrapped.step()
torch.save(results, out)
"""


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_one_process_match_untiled(tiny_paths, tmp_path):
    """ZeRO reduces each gradient from a hook; the ds_grad_is_ready marks let it take the chunks' sum once.
    One gloo process (a fresh interpreter: DeepSpeed and the process group stay out of the test process)."""
    out = tmp_path / "zero.pt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _ZERO_SCRIPT, str(tiny_paths["llama"]), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(out)
    for stage in (2, 3):
        for step in (0, 1):  # step 1 runs on weights the optimizer updated from the tiled gradients
            loss_ref, g_ref = results[(stage, None, step)]
            loss, g = results[(stage, 7, step)]
            torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
            for name in g_ref:
                assert g[name].abs().sum() > 0, (stage, step, name)
                torch.testing.assert_close(
                    g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m, s=stage, n=name: f"zero{s} {n}: {m}"
                )
