"""Shared pytest set-up: skip `gpu` / `multigpu` tests cleanly when no CUDA device is present."""

from __future__ import annotations

import os

import pytest


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # torch missing or broken: no GPU lane
        return 0


def pytest_configure(config):
    # Set before any Ray start (the raylet reads RAY_* system settings from its environment) and inherited by the CLI
    # subprocesses.
    # Ray Train 2.60 starts a PreemptionWatcher actor (one more Python process) with every fit, to react to nodes
    # being drained; nothing drains the test clusters, and the suite makes ~20 fits on 2 cores.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The raylet kills idle workers once the node has more workers than this (default: its CPUs, 2 here). Every fit
    # has more, so the idle worker that packed the last run's data (tokenizers and transformers imported) died and
    # every run's packing task started a cold one: 8 s per run instead of 1 s, measured over three 2-worker fits.
    os.environ.setdefault("RAY_num_workers_soft_limit", "32")


def pytest_collection_modifyitems(config, items):
    n = _cuda_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and n < 1:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(skip_multi)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster on 127.0.0.1 shared by every Ray test of the session (started on first use).

    Started the way `raytune-llm train` starts one (`driver.start_local_ray`), so the socket test sees its listeners.
    """
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        from raytune_llm.train.driver import start_local_ray

        start_local_ray(num_cpus=2)
    yield ray
    # left running for later tests; pytest's exit tears the local cluster down


@pytest.fixture(scope="session")
def ddp_two_workers(ray_session, tmp_path_factory):
    """The run folder of the quickstart trained with `_runs.TWO_WORKERS` and sharding.strategy=ddp, once per session:
    the uninterrupted curve the ZeRO runs (test_train_zero.py) and the worker-kill run (test_reliability.py) match.
    """
    from raytune_llm.train.driver import run_training
    from tests._runs import TWO_WORKERS, small_config

    out = tmp_path_factory.mktemp("ddp2")
    run_training(small_config(out, "ddp", TWO_WORKERS, "sharding.strategy=ddp"))
    return out / "ddp"
