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
    # Ray workers inherit the driver's environment: silence DeepSpeed's accelerator probe on the CPU lane.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
