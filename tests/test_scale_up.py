"""Asking an autoscaling cluster for a run's nodes (`cluster.scale_up_timeout_s`), on the session's local Ray cluster:
2 CPUs, no GPU and no autoscaler, so a request for GPUs is never met and the run is refused once the wait is over."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from raytune_llm.config import load_config
from raytune_llm.config.sections import ConfigError
from raytune_llm.train.driver import UserError, check_resources

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides):
    return load_config(ROOT / "conf" / "quickstart.yaml", ["train.num_workers=1", *overrides])


@pytest.mark.ray
def test_a_gpu_run_waits_for_the_nodes_then_is_refused_in_one_line(ray_session):
    with pytest.raises(UserError, match="needs 1 GPUs but the cluster has 0; .*set cluster.scale_up_timeout_s"):
        check_resources(_cfg("train.use_gpu=yes"))  # no wait asked for: refused at once, the setting named
    logged = []
    import raytune_llm.train.scale as scale

    began = time.monotonic()
    with pytest.raises(UserError, match=r"needs 1 GPUs but the cluster has 0 after 2 s; lower train.num_workers$"):
        cfg = _cfg("train.use_gpu=yes", "cluster.scale_up_timeout_s=2")
        res = scale.wait_for_resources(cfg, 1, 0.5, logged.append, poll_s=0.5)
        assert res.get("GPU", 0) == 0
        check_resources(cfg)
    took = time.monotonic() - began
    assert (
        "waiting up to 2 s (cluster.scale_up_timeout_s) for 1 GPUs and 0.5 CPUs; the cluster has 0 and 2" in logged[0]
    )
    assert 4 <= took < 20, took  # two waits of 2 s
    # what the cluster has is not waited for: a CPU run that fits starts at once whatever the timeout
    began = time.monotonic()
    assert check_resources(_cfg("train.use_gpu=no", "cluster.scale_up_timeout_s=60")) is False
    assert time.monotonic() - began < 2


def test_the_timeout_is_checked():
    with pytest.raises(ConfigError, match="scale_up_timeout_s must be >= 0, got -1"):
        _cfg("cluster.scale_up_timeout_s=-1")
