"""The `sweep` section: every problem reported with its dotted key, search spaces built, conf/sweep_lora.yaml valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_llm.config import ConfigError, load_config
from raytune_llm.tune.space import apply_overrides, param_space, parse_sweep

ROOT = Path(__file__).resolve().parents[2]


def _problems(sweep: dict, *overrides: str) -> list[str]:
    cfg = load_config(None, list(overrides))
    cfg.sweep = sweep
    with pytest.raises(ConfigError) as info:
        parse_sweep(cfg)
    return info.value.problems


def test_conf_sweep_lora_parses():
    spec = parse_sweep(load_config(ROOT / "conf" / "sweep_lora.yaml"))
    assert spec.space == {"train.lr": {"loguniform": [1e-4, 1e-2]}, "lora.r": {"choice": [8, 16]}}
    assert (spec.metric, spec.mode, spec.num_samples, spec.max_concurrent_trials) == ("eval_loss", "min", 8, 4)
    assert spec.gpus_per_trial == 0.25
    assert spec.scheduler.grace_period == 2 and spec.scheduler.max_t == 120 // 20  # max_steps / eval_every


def test_unknown_key_in_space_names_dotted_path_and_suggestion():
    (problem,) = _problems({"space": {"train.lrr": {"choice": [1e-3]}}})
    assert "unknown key 'train.lrr'" in problem and "did you mean 'train.lr'?" in problem


def test_every_problem_reported_at_once():
    problems = _problems(
        {
            "space": {
                "lora.r": {"choice": [8, -1]},
                "model.tiny.num_layers": {"grid": [1, 2]},
                "train.lr": {"logunifrm": [1e-4, 1e-2]},
                "train.weight_decay": {"loguniform": [0, 0.1]},
                "train.warmup_steps": {"uniform": [10, 5]},
            },
            "metrc": "eval_loss",
            "scheduler": {"asha": {"grace_perod": 2}},
        }
    )
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "sweep.space['lora.r'] = -1: lora.r must be > 0, got -1" in text
    assert "'model.tiny.num_layers' cannot be swept" in text
    assert "unknown distribution 'logunifrm'; did you mean 'loguniform'?" in text
    assert "loguniform: bounds must be > 0" in text
    assert "low 10 must be below high 5" in text
    assert "unknown key 'sweep.metrc'; did you mean 'sweep.metric'?" in text
    assert "did you mean 'sweep.scheduler.asha.grace_period'?" in text


def test_space_from_dotlist_overrides_is_flattened():
    cfg = load_config(None, ["sweep.space.train.lr.grid=[1e-3,3e-3]", "sweep.space.lora.r.choice=[4,8]"])
    spec = parse_sweep(cfg)
    assert spec.space == {"train.lr": {"grid": [1e-3, 3e-3]}, "lora.r": {"choice": [4, 8]}}
    assert spec.num_trials == 2


def test_fractional_gpus_must_split_evenly():
    (problem,) = _problems({"space": {"lora.r": {"choice": [8]}}, "gpus_per_trial": 3}, "train.num_workers=2")
    assert "1.5 GPUs" in problem
    cfg = load_config(None, ["train.num_workers=2"])
    cfg.sweep = {"space": {"lora.r": {"choice": [8]}}, "gpus_per_trial": 0.5}
    assert parse_sweep(cfg).gpus_per_trial == 0.5


def test_user_data_needs_eval_path_for_eval_loss(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    (problem,) = _problems({"space": {"lora.r": {"choice": [8]}}}, f"data.path={data}")
    assert "sweep.eval_path" in problem


def test_apply_overrides_and_param_space():
    cfg = apply_overrides(load_config(None), {"train.lr": 1e-4, "lora.target_modules": ["q_proj", "v_proj"]})
    assert cfg.train.lr == 1e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    base = load_config(None)
    base.sweep = {"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "lora.r": {"grid": [8, 16]}}}
    space = param_space(parse_sweep(base))
    assert space["lora.r"] == {"grid_search": [8, 16]}
    samples = [space["train.lr"].sample() for _ in range(200)]
    assert 1e-4 <= min(samples) and max(samples) <= 1e-2


def test_cli_sweep_reports_a_bad_space_in_one_line_before_ray(capsys):
    from raytune_llm.cli import main

    assert main(["sweep", str(ROOT / "conf" / "sweep_lora.yaml"), "sweep.space.train.lrr.choice=[1e-3]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raytune-llm: error: sweep:") and "did you mean 'train.lr'?" in err
    assert len(err.splitlines()) == 1


def test_a_grace_period_longer_than_a_trial_is_refused():
    # ASHA asserts grace_period <= max_t inside Tune (a traceback); the default max_t is the reports a trial makes.
    cfg = load_config(ROOT / "conf" / "sweep_lora.yaml", ["train.max_steps=4"])
    with pytest.raises(ConfigError, match="grace_period 2 exceeds the 1 report"):
        parse_sweep(cfg)
