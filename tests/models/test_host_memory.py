"""sharding.host_memory: the pinned host bytes it counts are the bytes the offload chain copies, and a run that
would not fit its node's memory is refused in one line."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models import attention_stash
from raytune_llm.models.load import load_model
from raytune_llm.models.patch import patch, unpatch
from raytune_llm.models.settings import set_last_layer_on_device, set_stash_attention
from raytune_llm.sharding.host_memory import (
    GIB,
    PINNED_AT_SETUP,
    HostMemoryError,
    check_host_memory,
    patched_pinned_bytes,
    pinned_host_bytes,
)
from raytune_llm.sharding.shapes import LLAMA31_8B, Shape
from tests.models.conftest import VOCAB


@pytest.mark.parametrize(
    "stash,o_proj,last_on_device", [(False, True, False), (True, True, False), (True, False, False), (True, True, True)]
)
def test_the_count_is_what_the_offload_chain_copies(tiny_paths, monkeypatch, stash, o_proj, last_on_device):
    # Real layers on the CPU (fp32: 4 bytes an activation): the bytes the forward hands to host copies at 48 tokens
    # less those at 24 (what does not grow with the tokens, the O adapter and, on the CPU's reference path, its
    # weight, cancels) against the count's difference, which leaves out only the O adapter's x A^T (r columns; 1.5%
    # here, 0.1% at 8B). The kept MLP outputs are counted on the GPU (tests/models/test_memory_settings.py): the
    # CPU's reference MLP keeps none.
    model = load_model(tiny_paths["llama"], lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu")
    unpatch(model)
    report = patch(model, gradient_checkpointing="offload")
    set_stash_attention(model, stash, o_proj=o_proj)
    set_last_layer_on_device(model, last_on_device)
    copied = [0]
    real = attention_stash.HostCopies._to_host
    monkeypatch.setattr(
        attention_stash.HostCopies,
        "_to_host",
        lambda self, raw: copied.__setitem__(0, copied[0] + raw.numel()) or real(self, raw),
    )
    model.train()
    shape = Shape.from_hf(model.get_base_model().config.to_dict())
    got, want = [], []
    for seq in (12, 24):
        ids = torch.randint(3, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0))
        copied[0] = 0
        model(input_ids=ids, labels=ids).loss.backward()
        got.append(copied[0])
        want.append(sum(patched_pinned_bytes(report, shape, ids.numel(), act_bytes=4).values()))
    assert want[1] > want[0] > 0
    assert abs((got[1] - got[0]) - (want[1] - want[0])) <= 0.02 * (want[1] - want[0]), (got, want)


def test_a_run_that_would_not_fit_the_node_is_refused_in_one_line():
    shape = Shape.from_hf(LLAMA31_8B)
    # Session 16's 1x65536 runs on a 125 GiB host: +hostkeep12 ran (120 GiB pinned with the allocator's rounding of
    # that session, 113.9 by this count), +hostkeep16 was killed (127.9 by this count).
    common = dict(stash_attention=True, last_layer_on_device=True, keep_mlp_layers=2, tables_on_host=2)
    ran = pinned_host_bytes(shape, 65536, keep_mlp_layers_on_host=12, **common)
    killed = pinned_host_bytes(shape, 65536, keep_mlp_layers_on_host=16, **common)
    assert ran["kept MLP outputs"] == 12 * 2 * 2 * 65536 * 14336 and ran["layer inputs"] == 31 * 2 * 65536 * 4096
    check_host_memory(ran, total=125 * GIB)
    with pytest.raises(HostMemoryError, match=r"needs 1\d\d\.\d GiB of pinned host memory.*lower") as err:
        check_host_memory(killed, total=125 * GIB)
    assert "\n" not in str(err.value) and "kept MLP outputs 56.0 GiB" in str(err.value)  # the largest part named
    with pytest.raises(HostMemoryError, match=r"\(8 processes\)"):  # one GPU worker each
        check_host_memory(pinned_host_bytes(shape, 8192, **common), processes=8, total=64 * GIB)
    assert patched_pinned_bytes(None, shape, 8192) == {}  # the standard stack: nothing pinned by us
    # Session 17 on the device host (MemTotal below), one process each: +hostkeep13, +stashattn+hostkeep18 and (the
    # tables on the GPU) +hostkeep14 ran, with 1.3-3.8 GiB left; +hostkeep14 with the tables on the host would leave
    # at most 0.5 GiB after the 4.4-5.1 GiB the process took besides its pinned blocks
    node = 131981020 * 1024
    check_host_memory(pinned_host_bytes(shape, 65536, keep_mlp_layers_on_host=13, **common), total=node)
    check_host_memory(
        pinned_host_bytes(shape, 65536, stash_o_proj=False, keep_mlp_layers_on_host=18, **common), total=node
    )
    check_host_memory(
        pinned_host_bytes(shape, 65536, **dict(common, tables_on_host=0), keep_mlp_layers_on_host=14), total=node
    )
    with pytest.raises(HostMemoryError, match=r"needs 120\.9 GiB.*has 125\.9 GiB \(119\.6 usable\)"):
        check_host_memory(pinned_host_bytes(shape, 65536, keep_mlp_layers_on_host=14, **common), total=node)
    # The tables on the GPU, the last 2 layers' stashes there too (no GPU peak cost, session 18): a 15th whole layer
    # does not fit, its gate output alone (1.75 GiB) does; the gate counts only on layers the whole ones left
    gpu_tables = dict(common, tables_on_host=0, last_layer_on_device=2)
    gate = pinned_host_bytes(shape, 65536, keep_mlp_layers_on_host=14, keep_mlp_gate_on_host=1, **gpu_tables)
    assert gate["kept MLP outputs"] == (14 * 2 + 1) * 2 * 65536 * 14336
    check_host_memory(gate, total=node)
    with pytest.raises(HostMemoryError, match=r"needs 120\.2 GiB.*\(119\.6 usable\)"):
        check_host_memory(pinned_host_bytes(shape, 65536, keep_mlp_layers_on_host=15, **gpu_tables), total=node)
    every = pinned_host_bytes(shape, 65536, keep_mlp_layers_on_host=40, keep_mlp_gate_on_host=5, **gpu_tables)
    assert every["kept MLP outputs"] == 30 * 2 * 2 * 65536 * 14336  # all but the last 2 (GPU-kept): no gate left
    # the least node memory that passes: what `raytune-llm plan` prints
    from raytune_llm.sharding.host_memory import node_memory_needed

    for needed, processes in ((ran, 1), ({"layer inputs": 10 * GIB}, 8), ({"layer inputs": 100 * GIB}, 2)):
        least = node_memory_needed(sum(needed.values()), processes)
        check_host_memory(needed, processes, total=int(least) + 1)
        with pytest.raises(HostMemoryError):
            check_host_memory(needed, processes, total=int(least * 0.999))
    assert node_memory_needed(100 * GIB) == 106 * GIB and node_memory_needed(200 * GIB) == 200 / 0.95 * GIB
    # what is free now: pinned memory held elsewhere (another job, blocks torch cached from an earlier run)
    check_host_memory(ran, total=125 * GIB, available=120 * GIB)
    with pytest.raises(HostMemoryError, match=r"will pin 113\.9 GiB more host memory.*has 100\.0 GiB free now") as err:
        check_host_memory(ran, total=125 * GIB, available=100 * GIB)
    assert "\n" not in str(err.value) and str(err.value).endswith("lower model.stash_attention")
    # the tables (and layer weights) are pinned when set, before the check: free memory no longer holds them
    just = sum(ran.values()) - ran["host tables"] + 2 * GIB  # what passes, exactly
    check_host_memory(ran, total=125 * GIB, available=just, pinned_now=PINNED_AT_SETUP)
    with pytest.raises(HostMemoryError, match=r"will pin 112\.0 GiB more"):
        check_host_memory(ran, total=125 * GIB, available=just - 1, pinned_now=PINNED_AT_SETUP)
    with pytest.raises(HostMemoryError, match=r"will pin 113\.9 GiB more"):  # counted again, it would not pass
        check_host_memory(ran, total=125 * GIB, available=just)
    check_host_memory({}, total=1, available=0)  # nothing pinned: nothing to check


def test_the_planner_shows_the_same_host_bytes():
    # `raytune-llm plan`'s host line is this count (plus ZeRO's offloaded states, none under DDP).
    from raytune_llm.sharding.planner import plan_from_values

    kw = dict(stash_attention=True, last_layer_on_device=True, keep_mlp_layers=2, keep_mlp_layers_on_host=12)
    host = "host: offloaded (not on GPU)"
    for chunk in (0, "auto", 8192):  # a split MLP (auto splits above ~37k tokens at 8B) keeps no outputs
        plan = plan_from_values(
            LLAMA31_8B,
            seq_len=65536,
            checkpointing="offload",
            embeddings_on_host=True,
            head_on_host=True,
            mlp_chunk_tokens=chunk,
            **kw,
        )
        want = pinned_host_bytes(Shape.from_hf(LLAMA31_8B), 65536, tables_on_host=2, mlp_chunk_tokens=chunk, **kw)
        assert plan.strategy == "DDP" and plan.breakdown[host] == sum(want.values())
        assert ("kept MLP outputs" in want) == (chunk == 0), (chunk, want)
    off = plan_from_values(LLAMA31_8B, seq_len=65536, checkpointing="on", **kw)
    assert "host: offloaded (not on GPU)" not in off.breakdown  # nothing pinned without offload
    # the stash without the O projection's output (model.stash_o_proj: false): 31 layers x 512 MiB less
    from raytune_llm.config import load_config

    assert not load_config(None, ["model.stash_o_proj=false"]).model.stash_o_proj
    no_o = plan_from_values(
        LLAMA31_8B,
        seq_len=65536,
        checkpointing="offload",
        embeddings_on_host=True,
        head_on_host=True,
        stash_o_proj=False,
        **kw,
    )
    key = "host: offloaded (not on GPU)"
    assert plan.breakdown[key] - no_o.breakdown[key] == 31 * 2 * 65536 * 4096


def test_weights_on_host_moves_all_but_three_layers_weights_in_the_plan():
    from raytune_llm.sharding.planner import plan_from_values

    kw = dict(seq_len=2048, micro_batch=4, checkpointing="offload", keep_mlp_layers=6)
    dev, host = plan_from_values(LLAMA31_8B, **kw), plan_from_values(LLAMA31_8B, weights_on_host=True, **kw)
    moved = dev.breakdown["weights (base model)"] - host.breakdown["weights (base model)"]
    assert 2.9 * GIB < moved < 3.0 * GIB  # 29 of 32 layers' packed NF4 weights (3.25 GiB in all; absmax stays)
    key = "host: offloaded (not on GPU)"
    # on the host: every layer's, each buffer rounded up to a power of two by the pinned allocator (104 -> 128 MiB)
    assert host.breakdown[key] - dev.breakdown[key] == 32 * 128 * 2**20 and host.inputs["weights_on_host"]
    # only checkpointed layers let theirs go (the others keep them for their backward); q/v targets: theirs only
    half = plan_from_values(LLAMA31_8B, weights_on_host=True, checkpoint_layers=16, **kw).breakdown
    assert moved / 2.3 < dev.breakdown["weights (base model)"] - half["weights (base model)"] < moved / 2
    off = plan_from_values(LLAMA31_8B, weights_on_host=True, **{**kw, "checkpointing": "off", "keep_mlp_layers": 0})
    assert off.breakdown["weights (base model)"] == dev.breakdown["weights (base model)"]
    qv = dict(lora_targets=["q_proj", "v_proj"], **kw)
    qv_moved = (
        plan_from_values(LLAMA31_8B, **qv).breakdown["weights (base model)"]
        - (plan_from_values(LLAMA31_8B, weights_on_host=True, **qv).breakdown["weights (base model)"])
    )
    assert abs(qv_moved - moved * 20 / 208) < 2**20  # q and v: 20 of a layer's 208 Mi parameters
    zero = plan_from_values(LLAMA31_8B, weights_on_host=True, gpus_per_node=2, **kw).alternatives
    assert zero["ZeRO-3"] == plan_from_values(LLAMA31_8B, gpus_per_node=2, **kw).alternatives["ZeRO-3"]  # DDP only


def test_more_layers_on_the_device_move_their_bytes_from_the_host_to_the_gpu():
    # last_layer_on_device N at 1x16384 of 8B: N layers copy nothing (never layer 0); the planner puts N - 2 layers'
    # inputs and stashes on the GPU at the peak (the last one's are there either way, and the next one's are
    # prefetched during its backward; H200, session 18: N = 1 -> 3 +0.69 GiB, 1 -> 4 +1.26) and keeps the host-kept
    # layers below them
    from raytune_llm.sharding.host_memory import device_layers, host_kept_count, layer_offload_bytes
    from raytune_llm.sharding.planner import PlanError, plan_from_values

    shape = Shape.from_hf(LLAMA31_8B)
    layer_input, stash = layer_offload_bytes(shape, 16384, True)
    assert (layer_input, stash) == (128 << 20, 2 * 16384 * (2 * 4096 + 2 * 1024 + 4096) + 4 * 16384 * 32)
    assert [device_layers(shape, None, n) for n in (False, True, 3, 40)] == [0, 1, 3, 31]
    assert device_layers(shape, 30, 3) == 0  # the last layer not checkpointed: none
    assert host_kept_count(shape, None, 6, 30, 3) == 26 and host_kept_count(shape, None, 2, 30, 3) == 29
    kw = dict(
        seq_len=16384, checkpointing="offload", stash_attention=True, keep_mlp_layers=6, keep_mlp_layers_on_host=8
    )
    plans = {n: plan_from_values(LLAMA31_8B, last_layer_on_device=n, **kw) for n in (True, 1, 2, 3)}
    host = {n: p.breakdown["host: offloaded (not on GPU)"] for n, p in plans.items()}
    assert plans[True].peak_bytes == plans[1].peak_bytes == plans[2].peak_bytes and host[True] == host[1]
    assert host[1] - host[2] == layer_input + stash and host[1] - host[3] == 2 * (layer_input + stash)
    assert plans[3].peak_bytes - plans[1].peak_bytes == layer_input + stash
    with pytest.raises(PlanError, match="last_layer_on_device must be an int >= 0 or True or False"):
        plan_from_values(LLAMA31_8B, last_layer_on_device=-2)


def test_nothing_kept_is_counted_where_nothing_is_kept():
    # Without lean_recompute no layer keeps its MLP outputs (models.checkpointing), and an MLP split over its tokens
    # keeps none: the "auto" split starts at half the tokens in fp32 (models/tiling.py's rule, by element size)
    from raytune_llm.models.report import PatchReport

    shape = Shape.from_hf(LLAMA31_8B)
    report = PatchReport(family="llama", gradient_checkpointing="offload", mlp_chunk_tokens=0)
    report.keep_mlp_layers, report.keep_mlp_layers_on_host, report.keep_mlp_gate_on_host = 2, 4, 1
    assert patched_pinned_bytes(report, shape, 16384)["kept MLP outputs"] == 9 * 2 * 16384 * 14336
    report.lean_recompute = False
    assert "kept MLP outputs" not in patched_pinned_bytes(report, shape, 16384)
    kw = dict(keep_mlp_layers=2, keep_mlp_layers_on_host=4, mlp_chunk_tokens="auto")
    assert "kept MLP outputs" in pinned_host_bytes(shape, 20000, **kw)  # bf16: split above 37,440 tokens
    assert "kept MLP outputs" not in pinned_host_bytes(shape, 20000, act_bytes=4, **kw)  # fp32: above 18,688


def test_the_worker_check_counts_the_compute_dtype(monkeypatch):
    # An fp32 run pins twice a bf16 run's bytes: the worker passes its dtype's element size
    import raytune_llm.sharding.host_memory as hm
    from raytune_llm.models.report import PatchReport

    report = PatchReport(family="llama", gradient_checkpointing="offload", stash_attention=True, mlp_chunk_tokens=0)
    bf16 = sum(patched_pinned_bytes(report, Shape.from_hf(LLAMA31_8B), 65536).values())
    lse = 4 * 65536 * 32 * 32  # the log-sum-exp is fp32 either way
    assert sum(patched_pinned_bytes(report, Shape.from_hf(LLAMA31_8B), 65536, 4).values()) == 2 * bf16 - lse
    monkeypatch.setattr(hm, "node_memory_bytes", lambda: int(bf16 * 1.3))
    monkeypatch.setattr(hm, "node_available_bytes", lambda: None)
    hm.check_patched_host_memory(report, LLAMA31_8B, 65536)
    with pytest.raises(HostMemoryError, match="needs"):
        hm.check_patched_host_memory(report, LLAMA31_8B, 65536, act_bytes=4)
