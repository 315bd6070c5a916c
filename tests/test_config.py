"""Config schema: YAML + overrides, every error reported at once with its dotted key, conf/ files load."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytune_llm.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from raytune_llm.config_save import redact, save_config

ROOT = Path(__file__).resolve().parents[1]


def _errors(tmp_path, text: str, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p, list(overrides))
    return exc.value.problems


def test_defaults_are_the_quickstart():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "quickstart" and cfg.model.path is None and cfg.train.num_workers == 2


def test_unknown_keys_at_any_depth_with_suggestion(tmp_path):
    problems = _errors(tmp_path, "model:\n  pth: /x\n  tiny: {hiden_size: 8}\ntrian: {}\n")
    text = "\n".join(problems)
    assert "unknown key 'model.pth'; did you mean 'model.path'?" in text
    assert "unknown key 'model.tiny.hiden_size'; did you mean 'model.tiny.hidden_size'?" in text
    assert "unknown key 'trian'; did you mean 'train'?" in text
    assert len(problems) == 3


def test_wrong_types_and_values_name_key_value_and_allowed(tmp_path):
    problems = _errors(tmp_path, "quant: {bits: 8}\ntrain: {lr: fast, num_workers: 0}\nlora: {dropout: 1.5}\n")
    text = "\n".join(problems)
    assert "quant.bits: 8 is not allowed; choose one of 4, 16" in text
    assert "train.lr: expected a number, got 'fast'" in text
    assert "lora.dropout must be in [0, 1), got 1.5" in text
    assert "train.num_workers must be > 0, got 0" in text
    assert len(problems) == 4


def test_all_errors_of_a_file_reported_together(tmp_path):
    problems = _errors(tmp_path, "train: {num_workers: 0}\nlora: {r: 0}\ndata: {seq_len: -1}\nmodel: {dtype: int8}\n")
    assert len(problems) == 4
    keys = ["train.num_workers", "lora.r", "data.seq_len", "model.dtype"]
    for key in keys:
        assert any(p.startswith(key) for p in problems), (key, problems)


def test_overrides_merge_and_validate(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {max_steps: 10}\n")
    cfg = load_config(p, ["train.max_steps=7", "quant.bits=4", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.train.max_steps == 7 and cfg.quant.bits == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(p, ["train.max_steps"])
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'; did you mean 'train.max_steps'"):
        load_config(p, ["train.max_step=3"])
    # an override that is not YAML, or has no key, is named: not the file
    assert _errors(tmp_path, "train: {max_steps: 10}\n", ["train.max_steps=3", "lora.r=[1,2"]) == [
        "override 'lora.r=[1,2': did not find expected ',' or ']'"
    ]
    assert _errors(tmp_path, "train: {max_steps: 10}\n", ["=5"]) == ["override '=5' is not key=value"]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(bad)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "a\x00b", ""])
def test_unsafe_run_names_rejected(name):
    with pytest.raises(ConfigError, match="not a plain name"):
        from_dict({"name": name})


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_every_conf_file_loads_and_says_how_to_run(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# raytune-llm ") or first.startswith("# ray "), first
    load_config(path)


def test_round_trip_and_saved_config_redacts_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue")
    cfg = load_config(None, ["cluster.runtime_env={env_vars: {HF_TOKEN: hf_supersecretvalue, A: b}}"])
    assert from_dict(to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "hf_supersecretvalue" not in text and "A: b" in text
    assert redact({"x": "hf_supersecretvalue"}) == {"x": "***"}


def test_validate_command_is_fast_and_needs_no_ray_or_torch():
    code = (
        "import sys, time; t=time.perf_counter(); from raytune_llm.cli import main; "
        "rc = main(['validate', 'conf/quickstart.yaml', 'train.max_steps=5']); "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'validate imported torch/ray'; "
        "print('elapsed', time.perf_counter() - t); sys.exit(rc)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    assert wall < 3.0, f"validate took {wall:.2f} s"


def test_validate_with_a_data_file_needs_no_torch_either(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    code = (
        "import sys; from raytune_llm.cli import main; "
        f"rc = main(['validate', 'conf/quickstart.yaml', 'data.path={data}', 'data.on_bad_record=skip', "
        "'data.max_bad_fraction=1']); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'validate imported torch'; "
        "sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "data: 2 records" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("value", ["-1", "big", "1.5", "true", "'512'"])
def test_bad_mlp_chunk_tokens_is_one_error_naming_the_key(tmp_path, value):
    problems = _errors(tmp_path, f"model: {{mlp_chunk_tokens: {value}}}\n")
    assert len(problems) == 1 and problems[0].startswith("model.mlp_chunk_tokens"), problems


def test_mlp_chunk_tokens_accepts_an_int_auto_and_off():
    assert load_config(None).model.mlp_chunk_tokens == "auto"
    for text, value in (("4096", 4096), ("auto", "auto"), ("0", 0), ("null", None)):
        cfg = load_config(None, [f"model.mlp_chunk_tokens={text}"])
        assert cfg.model.mlp_chunk_tokens == value
        assert from_dict(to_dict(cfg)).model.mlp_chunk_tokens == value


def test_bare_yaml_on_off_yes_no_read_as_the_words(tmp_path):
    # YAML 1.1 turns a bare on / off / yes / no into a boolean; the choices take the word back.
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  gradient_checkpointing: on\ntrain:\n  use_gpu: no\n")
    cfg = load_config(path)
    assert (cfg.model.gradient_checkpointing, cfg.train.use_gpu) == ("on", "no")
    assert load_config(None, ["model.gradient_checkpointing=off"]).model.gradient_checkpointing == "off"


def test_random_weights_needs_a_model_folder_and_no_exports(tmp_path):
    (problem,) = _errors(tmp_path, "model: {random_weights: true}\nexport: {formats: []}\n")
    assert "model.random_weights needs model.path" in problem, problem
    (problem,) = _errors(tmp_path, "model: {random_weights: true, path: /m}\n")
    assert "nothing to export: set export.formats=[] (got ['adapter', 'hf'])" in problem, problem
    cfg = load_config(None, ["model.random_weights=true", "model.path=/m", "export.formats=[]"])
    assert cfg.model.random_weights and from_dict(to_dict(cfg)).model.random_weights


@pytest.mark.parametrize(
    ("override", "ours"),
    [
        ("lora.rank=4", "lora.r"),
        ("lora.lora_alpha=8", "lora.alpha"),
        ("train.learning_rate=1e-3", "train.lr"),
        ("data.max_seq_length=64", "data.seq_len"),
        ("train.gradient_accumulation_steps=2", "train.grad_accum"),
    ],
)
def test_other_tools_names_for_a_setting_point_to_ours(override, ours):
    with pytest.raises(ConfigError, match=f"unknown key '{override.split('=')[0]}'; did you mean '{ours}'"):
        load_config(ROOT / "conf" / "quickstart.yaml", [override])
