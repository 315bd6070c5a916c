"""A run of an existing name: what it may change, and where its checkpoints live (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_llm.config import load_config, save_config
from raytune_llm.train.driver import UserError, check_rerun, run_storage

ROOT = Path(__file__).resolve().parents[1]


def _run_folder(tmp_path, *overrides):
    cfg = load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=r", *overrides])
    save_config(cfg, cfg.run_dir / "config.yaml")
    (cfg.run_dir / "base_model").mkdir(parents=True)
    (cfg.run_dir / "base_model" / "config.json").write_text("{}")  # built by the earlier run
    return cfg


def test_a_rerun_may_change_length_cadence_and_exports_only(tmp_path):
    _run_folder(tmp_path)
    same = [f"output_dir={tmp_path}", "name=r"]
    ok = ["train.max_steps=400", "train.checkpoint_every=7", "export.formats=[adapter]", "train.log_every=3"]
    check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [*same, *ok]))
    for override, key in (
        ("train.lr=0.5", "train.lr"),
        ("model.tiny.hidden_size=64", "model.tiny.hidden_size"),
        ("train.seed=7", "train.seed"),
        ("lora.r=4", "lora.r"),
    ):
        cfg = load_config(ROOT / "conf" / "quickstart.yaml", [*same, override])
        with pytest.raises(UserError, match=f"cannot resume run 'r': its base model was made with {key}="):
            check_rerun(cfg)
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "lr: 0.5" not in saved  # the record of what was trained is untouched


def test_a_new_name_or_an_empty_folder_is_not_checked(tmp_path):
    check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=fresh"]))
    cfg = load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=r2"])
    save_config(cfg, cfg.run_dir / "config.yaml")  # a run that stopped before building anything
    check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=r2", "train.lr=0.5"]))


def test_checkpoints_of_a_shared_storage_path_are_kept_per_run_name(tmp_path):
    a = load_config(None, ["name=a", "cluster.storage_path=s3://bucket/x/"])
    b = load_config(None, ["name=b", "cluster.storage_path=/shared/ckpt"])
    assert run_storage(a, tmp_path) == "s3://bucket/x/a" and run_storage(b, tmp_path) == "/shared/ckpt/b"
    assert run_storage(load_config(None, ["name=c"]), tmp_path / "c") == str(tmp_path / "c" / "ray")
