"""A sweep's best trial as a run folder (tune.results.export_best), run again on a finished sweep."""

from __future__ import annotations

from pathlib import Path

from raytune_llm.config import load_config
from raytune_llm.tune.results import export_best
from raytune_llm.tune.space import parse_sweep

from .conftest import build_run

ROOT = Path(__file__).resolve().parents[2]


def test_the_same_best_trial_keeps_the_users_exports_and_another_does_not(tmp_path, llama_base):
    ckpt = build_run(tmp_path / "ckpt", llama_base)  # a trial checkpoint: adapter/ (+ metrics.jsonl)
    (ckpt / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    cfg = load_config(ROOT / "conf" / "sweep_lora.yaml")
    spec = parse_sweep(cfg)
    row = {"trial_id": "a", "checkpoint": str(ckpt), "train.lr": 1e-3, "lora.r": 8, "eval_loss": 1.5}
    folder = tmp_path / "sweep"
    export_best(row, spec, cfg, folder, use_gpu=False)
    (folder / "best" / "exports" / "hf").mkdir()
    (folder / "best" / "exports" / "hf" / "model.safetensors").write_text("the user's merged export")
    export_best(row, spec, cfg, folder, use_gpu=False)  # the finished sweep run again: same best trial
    assert (folder / "best" / "exports" / "hf" / "model.safetensors").is_file()
    assert (folder / "best" / "exports" / "adapter" / "adapter_config.json").is_file()
    export_best({**row, "trial_id": "b", "train.lr": 2e-3}, spec, cfg, folder, use_gpu=False)  # another best
    assert not (folder / "best" / "exports" / "hf").exists()  # it was the other trial's
    assert (folder / "best" / "exports" / "adapter" / "adapter_config.json").is_file()
