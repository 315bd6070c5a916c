"""ZeRO-3 + checkpointed QLoRA layers: each layer's frozen base is partitioned again once its backward is done.

DeepSpeed 0.19 attributes the frozen weights a checkpointed layer's recompute gathers to an outer module and keeps
them gathered until the whole backward ends; on 2 H200s at 70B shapes that made a 55.8 GiB per-GPU peak out of
about 19 GiB of partitions. `sharding.engine.frozen_releaser`, called after each layer's backward, bounds the
gathered frozen weights to about one layer during backward, and changes no gradient. 2 gloo processes on CPU, the
persistence threshold at 0 so the tiny weights are partitioned as a 70B's are.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.slow]

LAYERS = 4


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, hook: bool, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import raytune_llm.sharding.zero as zero
    from raytune_llm.config import load_config
    from raytune_llm.models.settings import set_after_layer_backward
    from raytune_llm.models.synthetic import build_synthetic_model
    from raytune_llm.train import sharded

    zero._PERSISTENCE_THRESHOLD = 0
    torch.manual_seed(0)  # the adapters' initialisation
    shape = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": LAYERS}
    shape.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = build_synthetic_model(
        shape, gradient_checkpointing="on", dtype=torch.float32, device="cpu", quant_storage=torch.float32
    )
    cfg = load_config(None, ["model.dtype=fp32", "quant.bits=4", "quant.storage_dtype=fp32", "sharding.strategy=zero3"])
    engine = sharded.wrap(model, cfg, "zero3", False, False, torch.float32, torch.device("cpu"), 2).wrapped
    if not hook:
        set_after_layer_backward(model, None)
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_grad

    frozen = [p for n, p in engine.module.named_parameters() if ".layers." in n and hasattr(p, "ds_id")]
    frozen = [p for p in frozen if not p.requires_grad]
    layer_numel = sum(p.ds_numel for p in frozen) // LAYERS
    seen = []  # gathered frozen layer weights, in layers, when each layer's LoRA gradient arrives
    for n, p in engine.module.named_parameters():
        if p.requires_grad and "down_proj.lora_B" in n:
            p.register_hook(lambda g: seen.append(sum(
                q.ds_numel for q in frozen if q.ds_status == ZeroParamStatus.AVAILABLE) / layer_numel) or g)  # fmt: skip
    gen = torch.Generator().manual_seed(rank)
    grads = []
    for _ in range(2):
        ids = torch.randint(0, 256, (1, 48), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        grads.append([safe_get_full_grad(p).clone() for p in engine.module.parameters() if p.requires_grad])
        engine.step()
    if rank == 0:
        torch.save({"seen": seen, "grads": grads}, out)
    dist.destroy_process_group()


def _run(hook: bool, folder) -> dict:
    """The two ranks in fresh interpreters (`spawn`); rank 0's findings come back through a file. Nothing here may
    fork this process: a forked copy of a Ray driver (the session's cluster is up) disconnects it when it exits."""
    import torch.multiprocessing as mp

    out = folder / f"rank0_{hook}.pt"
    mp.spawn(_rank, args=(_port(), hook, str(out)), nprocs=2)
    return torch.load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero3_release")
    return {hook: _run(hook, folder) for hook in (True, False)}


def test_gathered_frozen_weights_stay_near_one_layer_in_backward(runs):
    with_hook, without = runs[True]["seen"], runs[False]["seen"]
    assert len(with_hook) == 2 * LAYERS
    # The first step's backward (a trace still being recorded) holds the layer being released and no other.
    assert max(with_hook[:LAYERS]) <= 1.0 + 1e-9, with_hook
    # Without the release, DeepSpeed's attribution keeps every recomputed layer gathered to the end.
    assert without[LAYERS - 1] >= LAYERS - 1, without


def test_release_changes_no_gradient(runs):
    for a, b in zip(runs[True]["grads"], runs[False]["grads"]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
