"""A real sweep on the local Ray cluster: ASHA stops trials, the best is the best, failures and interruptions.

Tiny Llama, the bundled task cut down, 24 steps per trial, one CPU worker of 0.5 CPU per trial:
each trial is one Ray Train run inside a Tune function trainable, as in production. One sweep, interrupted and
resumed, proves it all with three Ray Train runs (the failing trials end before theirs would start).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from raytune_llm.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=1",
    "data.seq_len=64",
    "data.num_examples=400",
    "data.eval_examples=40",
    "train.num_workers=1",
    "train.cpus_per_worker=0.5",
    "train.micro_batch_size=4",
    "train.max_steps=24",
    "train.warmup_steps=2",
    "train.log_every=100",
    "export.formats=[]",
]


def _cfg(tmp_path: Path, name: str, sweep: dict):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", f"name={name}"])
    cfg.sweep = sweep
    return cfg


def _tune_results(folder: Path) -> dict[str, list[dict]]:
    """Every trial's reports, read straight from Tune's per-trial result.json files."""
    out = {}
    for f in (folder / "tune").glob("*/result.json"):
        reports = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if reports:
            out[reports[0]["trial_id"]] = reports
    return out


def _interrupt_at_trial(ray, folder: Path, n: int, runs: int) -> threading.Thread:
    """Send this process SIGUSR1 (Tune's Ctrl-C) once Tune has created its `n`-th trial, before that trial starts.

    With one trial at a time the n-th is created only after every earlier one has ended. Tune's own result files
    reach the sweep folder later, in periodic syncs, so they cannot be the cue; the trial's folder in the driver's
    staging area (`<Ray session>/artifacts/<time>/tune/driver_artifacts/`, Ray 2.60) appears as Tune creates the
    trial. Should that layout change, the n-th trial's Ray Train run folder, the `runs`-th under trials/, is the cue
    (later; a trial that fails before its Ray Train run starts leaves none).
    """
    staging = Path(ray._private.worker._global_node.get_session_dir_path()) / "artifacts"
    pattern = "*/tune/driver_artifacts/_run_trial_*"
    before = set(staging.glob(pattern))

    def watch():
        while True:
            if len(set(staging.glob(pattern)) - before) >= n:
                break
            if (folder / "trials").is_dir() and len(list((folder / "trials").iterdir())) >= runs:
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_asha_failed_trial_interrupt_resume_and_best_export(ray_session, tmp_path):
    from raytune_llm.train.driver import UserError
    from raytune_llm.tune.sweep import run_sweep

    # One trial at a time, in grid order (the first key varies fastest):
    #   0 (q,v) 3e-3   trains 24 steps: ASHA records its eval_loss at every rung
    #   1 no_such 3e-3 fails in its trial (no such layer in the model) and must not stop the others
    #   2 (q,v) 1e-7   trails trial 0 at the first rung (step 4), where trial 0's is the only value and so the
    #                  cutoff: ASHA stops it. (Before the interruption: Tune does not save the scheduler, so the
    #                  resumed sweep's ASHA starts empty.)
    #   3 no_such 1e-7 fails
    #   4 (q,v) 1e-3   the sweep is interrupted as Tune creates it; the resumed sweep trains it
    #   5 no_such 1e-3 fails, in the resumed sweep
    sweep = {
        "space": {
            "lora.target_modules": {"grid": [["q_proj", "v_proj"], ["no_such_proj"]]},
            "train.lr": {"grid": [3e-3, 1e-7, 1e-3]},
        },
        "metric": "eval_loss",
        "max_concurrent_trials": 1,
        "eval_every": 4,
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
    }
    folder = tmp_path / "asha-sweep"
    watcher = _interrupt_at_trial(ray_session, folder, 5, runs=3)
    text = run_sweep(_cfg(tmp_path, "asha", sweep))
    watcher.join(timeout=1)
    first = json.loads((folder / "results.json").read_text())
    assert not first["complete"], text
    counts = first["counts"]
    assert (counts["done"], counts["stopped"], counts["error"]) == (1, 1, 2), text
    assert counts["unfinished"] + first["not_started"] == 2, text
    assert first["best_adapter"] is None and "run the same command again" in text
    ended = {r["trial"] for r in first["trials"] if r["status"] in ("done", "stopped")}
    ended_reports = {tid: rep for tid, rep in _tune_results(folder).items() if tid in ended}
    assert ended_reports.keys() == ended

    # A different search space must not silently resume this folder.
    with pytest.raises(UserError, match="sweep.eval_every"):
        run_sweep(_cfg(tmp_path, "asha", {**sweep, "eval_every": 8}))

    text = run_sweep(_cfg(tmp_path, "asha", sweep))
    summary = json.loads((folder / "results.json").read_text())
    rows = summary["trials"]
    assert len(rows) == 6 and summary["complete"], text
    status = {(tuple(r["lora.target_modules"]), r["train.lr"]): r["status"] for r in rows}
    qv, bad = ("q_proj", "v_proj"), ("no_such_proj",)
    assert status == {
        (qv, 3e-3): "done",
        (qv, 1e-7): "stopped",
        (qv, 1e-3): "done",
        (bad, 3e-3): "error",
        (bad, 1e-7): "error",
        (bad, 1e-3): "error",
    }, text
    for r in rows:
        if r["status"] == "error":
            assert "no_such_proj" in r["error"] or "target modules" in r["error"].lower(), r["error"]
        else:  # stopped trials ran fewer steps than max_steps, finished ones all of them
            assert (r["steps"] < 24) == (r["status"] == "stopped"), r

    # The finished and the stopped trial were not run again.
    reports = _tune_results(folder)
    assert {tid: reports[tid] for tid in ended} == ended_reports
    # The best, against Tune's own per-trial records: lowest eval_loss at each trial's last report.
    trained = [r for r in rows if r["status"] != "error"]
    assert set(reports) == {r["trial"] for r in trained}
    last = {tid: rep[-1]["eval_loss"] for tid, rep in reports.items()}
    assert summary["best"] == min(last, key=last.get)
    assert [r["trial"] for r in trained] == sorted(last, key=last.get) == [r["trial"] for r in rows[:3]]
    assert next(r for r in rows if r["trial"] == summary["best"])["train.lr"] in (3e-3, 1e-3)
    for r in trained:
        assert r["eval_loss"] == pytest.approx(last[r["trial"]])
        assert [s for s, _ in r["curve"]] == [4 * (i + 1) for i in range(len(r["curve"]))]

    csv_lines = (folder / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[1].split(",")[1] == summary["best"]
    assert (folder / "curves.png").stat().st_size > 10_000
    assert summary["best"] in text.splitlines()[1]

    # The exported adapter is the best trial's last checkpoint, in PEFT's format, and loads on the base.
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = Path(summary["best_adapter"])
    assert adapter == folder / "best" / "exports" / "adapter"
    best_ckpt = next(r for r in rows if r["trial"] == summary["best"])["checkpoint"]
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    trained_w = load_file(str(Path(best_ckpt) / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == trained_w.keys() and all(torch.equal(ours[k], trained_w[k].to(ours[k].dtype)) for k in ours)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base_model"), adapter)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
