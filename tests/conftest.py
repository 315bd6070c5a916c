"""Shared pytest set-up: skip `gpu` / `multigpu` tests cleanly when no CUDA device is present."""

from __future__ import annotations

import pytest


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # torch missing or broken: no GPU lane
        return 0


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
