"""Fixtures for the sharding tests: one Ray cluster per session shared by every Ray test here."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster on the machine's 2 cores, started once (or joined when already running)."""
    ray = pytest.importorskip("ray")
    # Every Ray command of a session must agree on the auth mode (a first ray.init writes a token and later
    # starts would turn token auth on); respect a mode set by the Makefile / CI.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray workers inherit the driver's environment: silence DeepSpeed's accelerator probe on the CPU lane
    # (never on a GPU machine, where it would pin DeepSpeed to the CPU).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


def run_suite(tmp, parts: list[str], use_gpu: bool = False, dtype: str = "fp32") -> dict:
    """Run `_loops.suite_loop` in one TorchTrainer fit of 2 workers and return rank 0's results."""
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tests.sharding import _loops

    _loops.save_tiny_base(str(tmp / "base"))
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 0.5}  # two workers must fit the 2-core CPU lane
    TorchTrainer(
        _loops.suite_loop,
        train_loop_config={
            "parts": parts,
            "strategies": ["ddp", "zero2", "zero3"],
            "ckpt_root": str(tmp / "ckpt"),
            "base": str(tmp / "base"),
            "dtype": dtype,
            "out": str(tmp / "results.pt"),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=str(tmp / "ray"), name="sharding_suite"),
    ).fit()
    return torch.load(tmp / "results.pt", weights_only=False)


@pytest.fixture(scope="session")
def sharding_suite(ray_cluster, tmp_path_factory):
    """DDP / ZeRO-2 / ZeRO-3 runs and the ZeRO-3 QLoRA check, all in one fit (~30 s of start-up each saved)."""
    return run_suite(tmp_path_factory.mktemp("sharding_suite"), ["strategies", "qlora"])
