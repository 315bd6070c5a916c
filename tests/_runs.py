"""Helpers shared by the tests that run the real trainer on small quickstart configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from raytune_llm.config import load_config

ROOT = Path(__file__).resolve().parents[1]

TWO_WORKERS = [
    "data.num_examples=400",
    "data.eval_examples=0",
    "export.formats=[adapter]",
    "train.num_workers=2",
    "train.max_steps=10",
    "train.checkpoint_every=5",
    "train.log_every=1",
    "train.warmup_steps=2",
]
"""Overrides of the 2-worker runs of the ZeRO and worker-failure tests: 10 steps, a checkpoint every 5. Their
uninterrupted DDP run (conftest.ddp_two_workers) is trained once per session and is the reference of both."""


def joining_env(ray_session) -> dict[str, str]:
    """Environment of a new driver process that joins the session's cluster (`raytune-llm` finds RAY_ADDRESS) instead
    of starting and stopping one of its own.

    The cluster listens on 127.0.0.1 only (`driver.start_local_ray`); with Ray's multi-node switch off, as there, the
    joining driver keeps that address instead of swapping in the machine's IP, where nothing answers.
    """
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", RAYTUNE_LLM_PROGRESS="0")
    env["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def small_config(out: Path, name: str, small: list[str], *extra: str):
    """The quickstart config in `out/name` with the `small` overrides, then `extra`."""
    return load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={out}", f"name={name}", *small, *extra])


def logged_losses(run: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl; fails when a step was logged twice."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def assert_resumed_from(run: Path, marker: Path, step: int) -> None:
    """Steps 1..`step` were logged before the fault `marker` was written and every later step after it: the restarted
    worker group continued from the step-`step` checkpoint (a restart from scratch would log every step after it)."""
    when = marker.stat().st_mtime
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    before = [r["step"] for r in rows if r["time"] < when]
    assert before == list(range(1, step + 1)), (before, step)
