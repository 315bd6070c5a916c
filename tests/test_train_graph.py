"""`train.cuda_graph: true` in the main trainer: each micro-batch goes through models.graphs.CapturedStep.

On these CPUs the step runs eagerly (a graph needs CUDA), so this proves the trainer's side of it: the packed rows
go in as host tensors, the gradients stay in the step's buffers (zeroed in place, never set to None) and the loss
curve is the session's 2-worker DDP run's, step for step. The recorded replay itself is proven against the eager loop
on the GPU (tests/models/test_graphs.py, marker gpu), packed rows included.
"""

from __future__ import annotations

import json

import pytest

from raytune_llm.config import ConfigError, load_config
from raytune_llm.train.driver import run_training
from tests._runs import ROOT, TWO_WORKERS, logged_losses, small_config


@pytest.mark.ray
@pytest.mark.slow
def test_cuda_graph_run_trains_like_the_ddp_run(ray_session, tmp_path, ddp_two_workers):
    run_training(small_config(tmp_path, "graph", TWO_WORKERS, "sharding.strategy=ddp", "train.cuda_graph=true"))
    want, got = logged_losses(ddp_two_workers), logged_losses(tmp_path / "graph")
    assert sorted(got) == sorted(want) == list(range(1, 11))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-6, (step, got[step], want[step])
    assert (tmp_path / "graph" / "adapter" / "adapter_config.json").exists()
    # the log steps say how many steps ran outside the recording (none here: on the CPU nothing is recorded)
    rows = [json.loads(x) for x in (tmp_path / "graph" / "metrics.jsonl").read_text().splitlines()]
    assert [r["graph_eager_steps"] for r in rows if "tokens_per_s" in r] and all(
        r["graph_eager_steps"] == 0 for r in rows if "tokens_per_s" in r
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["sharding.strategy=zero3"], "sharding.strategy=ddp"),
        (["model.fused=false"], "model.fused=true"),
        (["lora.dropout=0.1"], "lora.dropout=0"),
    ],
)
def test_cuda_graph_needs_ddp_fused_and_no_dropout(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "conf" / "quickstart.yaml", ["train.cuda_graph=true", *extra])
