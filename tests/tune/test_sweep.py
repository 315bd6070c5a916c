"""A real sweep on the local Ray cluster: ASHA stops trials, the best is the best, failures and interruptions.

Tiny Llama, the bundled task cut down, 24 steps per trial, one CPU worker of 0.5 CPU per trial:
each trial is one Ray Train run inside a Tune function trainable, as in production.
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


def test_asha_sweep_picks_the_best_trial(ray_session, tmp_path):
    from raytune_llm.tune.sweep import run_sweep

    # Two useful learning rates run first (2 at a time); the two tiny ones reach the first rung behind them.
    cfg = _cfg(
        tmp_path,
        "asha",
        {
            "space": {"train.lr": {"grid": [3e-3, 1e-3, 1e-6, 1e-7]}},
            "metric": "eval_loss",
            "max_concurrent_trials": 2,
            "eval_every": 4,
            "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
        },
    )
    text = run_sweep(cfg)
    folder = tmp_path / "asha-sweep"
    summary = json.loads((folder / "results.json").read_text())
    rows = summary["trials"]
    assert len(rows) == 4 and summary["complete"], text
    assert summary["counts"]["error"] == 0, text
    assert summary["counts"]["stopped"] >= 1, text
    for r in rows:  # stopped trials ran fewer steps than max_steps, finished ones all of them
        assert (r["steps"] < 24) == (r["status"] == "stopped"), r

    # The best, against Tune's own per-trial records: lowest eval_loss at each trial's last report.
    reports = _tune_results(folder)
    assert set(reports) == {r["trial"] for r in rows}
    last = {tid: rep[-1]["eval_loss"] for tid, rep in reports.items()}
    assert summary["best"] == min(last, key=last.get)
    assert [r["trial"] for r in rows] == sorted(last, key=last.get)
    assert next(r for r in rows if r["trial"] == summary["best"])["train.lr"] in (3e-3, 1e-3)
    for r in rows:
        assert r["eval_loss"] == pytest.approx(last[r["trial"]])
        assert [s for s, _ in r["curve"]] == [4 * (i + 1) for i in range(len(r["curve"]))]

    csv_lines = (folder / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[1].split(",")[1] == summary["best"]
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
    trained = load_file(str(Path(best_ckpt) / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == trained.keys() and all(torch.equal(ours[k], trained[k].to(ours[k].dtype)) for k in ours)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base_model"), adapter)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def _interrupt_after_first_trial(folder: Path) -> threading.Thread:
    """Send this process SIGUSR1 (Tune's Ctrl-C) once the second trial's Ray Train run has started.

    With one trial at a time the second starts only after Tune has recorded the first as finished
    (Tune's own result files reach the sweep folder later, in periodic syncs, so they cannot be the cue).
    """

    def watch():
        while not (folder / "trials").is_dir() or len(list((folder / "trials").iterdir())) < 2:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_failed_trial_and_resume_after_interrupt(ray_session, tmp_path):
    from raytune_llm.tune.sweep import run_sweep

    # One trial at a time: the first finishes, then the sweep is interrupted; the second fails in its
    # worker (no such layer in the model) and must not stop the third.
    sweep = {
        "space": {"lora.target_modules": {"grid": [["q_proj", "v_proj"], ["no_such_proj"], ["o_proj"]]}},
        "max_concurrent_trials": 1,
        "eval_every": 8,
    }
    cfg = _cfg(tmp_path, "resume", sweep)
    folder = tmp_path / "resume-sweep"
    watcher = _interrupt_after_first_trial(folder)
    text = run_sweep(cfg)
    watcher.join(timeout=1)
    first = json.loads((folder / "results.json").read_text())
    assert not first["complete"] and first["counts"]["done"] == 1, text
    assert first["counts"]["unfinished"] + first["counts"]["error"] + first["not_started"] == 2, text
    assert first["best_adapter"] is None and "run the same command again" in text
    done_id = next(r["trial"] for r in first["trials"] if r["status"] == "done")
    done_reports = _tune_results(folder)[done_id]

    # A different search space must not silently resume this folder.
    from raytune_llm.train.driver import UserError

    other = _cfg(tmp_path, "resume", {**sweep, "eval_every": 4})
    with pytest.raises(UserError, match="sweep.eval_every"):
        run_sweep(other)

    text = run_sweep(_cfg(tmp_path, "resume", sweep))
    final = json.loads((folder / "results.json").read_text())
    assert final["complete"], text
    status = {tuple(r["lora.target_modules"]): r["status"] for r in final["trials"]}
    assert status == {("q_proj", "v_proj"): "done", ("no_such_proj",): "error", ("o_proj",): "done"}, text
    failed = next(r for r in final["trials"] if r["status"] == "error")
    assert "no_such_proj" in failed["error"] or "target modules" in failed["error"].lower(), failed["error"]
    assert _tune_results(folder)[done_id] == done_reports  # the finished trial was not run again
    assert final["best"] in {r["trial"] for r in final["trials"] if r["status"] == "done"}
    assert (folder / "best" / "exports" / "adapter" / "adapter_config.json").is_file()
