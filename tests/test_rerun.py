"""A run of an existing name: what it may change, and where its checkpoints live (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_llm.config import load_config
from raytune_llm.config_save import save_config
from raytune_llm.train.driver import UserError, check_rerun, run_storage

ROOT = Path(__file__).resolve().parents[1]


def _run_folder(tmp_path, *overrides, trained=True):
    cfg = load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=r", *overrides])
    save_config(cfg, cfg.run_dir / "config.yaml")
    for part in ("base_model", "tokenizer") + (("adapter",) if trained else ()):
        (cfg.run_dir / part).mkdir(parents=True)
    (cfg.run_dir / "base_model" / "config.json").write_text("{}")  # built by the earlier run
    if trained:  # the final adapter of a finished run
        (cfg.run_dir / "adapter" / "adapter_config.json").write_text("{}")
    return cfg


def test_a_rerun_may_change_length_cadence_and_exports_only(tmp_path):
    _run_folder(tmp_path)
    same = [f"output_dir={tmp_path}", "name=r"]
    ok = ["train.max_steps=400", "train.checkpoint_every=7", "export.formats=[adapter]", "train.log_every=3"]
    assert check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [*same, *ok])) == []
    for override, key in (
        ("train.lr=0.5", "train.lr"),
        ("model.tiny.hidden_size=64", "model.tiny.hidden_size"),
        ("train.seed=7", "train.seed"),
        ("lora.r=4", "lora.r"),
    ):
        cfg = load_config(ROOT / "conf" / "quickstart.yaml", [*same, override])
        with pytest.raises(UserError, match=f"cannot resume run 'r': its adapter was made with {key}="):
            check_rerun(cfg)
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "lr: 0.5" not in saved  # the record of what was trained is untouched


def test_a_rerun_may_move_memory_and_resume_a_config_saved_before_a_setting_existed(tmp_path):
    # Where weights and activations sit changes no gradient: a resume may move them. A config.yaml written before
    # model.head_on_host existed lacks it; the run then had its default, which this run keeps.
    offload = "model.gradient_checkpointing=offload"
    cfg = _run_folder(tmp_path, offload)
    same = [f"output_dir={tmp_path}", "name=r", offload]
    moved = ["model.head_on_host=true", "model.keep_mlp_layers=2", "model.last_layer_on_device=true"]
    assert check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [*same, *moved])) == []
    with pytest.raises(UserError, match="model.gradient_checkpointing"):  # not a placement: refused as before
        check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [*same, "model.gradient_checkpointing=on"]))
    saved = cfg.run_dir / "config.yaml"
    lines = saved.read_text().splitlines()
    # model.fused is not a placement, so only the missing key's default can make these agree (compared as None,
    # as before, the first would be refused).
    saved.write_text("\n".join(line for line in lines if "fused:" not in line) + "\n")
    assert check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", same)) == []
    with pytest.raises(UserError, match="model.fused=True"):  # a missing key compares against its default
        check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [*same, "model.fused=false"]))


def test_a_run_that_never_trained_may_run_again_under_other_settings(tmp_path):
    # A run that stopped before its first step (bad data, LoRA targets the model lacks, too few CPUs) left its
    # config.yaml, base model and tokenizer: a corrected rerun goes ahead. The base model and tokenizer are handed back
    # for rebuilding only when what they are made from changed (here the data, which the tokenizer is trained on).
    _run_folder(tmp_path, trained=False)
    same = [f"output_dir={tmp_path}", "name=r"]
    for fix in ("lora.target_modules=[q_proj]", "train.num_workers=1", "train.lr=0.5"):
        assert check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [*same, fix])) == []
    data = tmp_path / "fixed.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    stale = check_rerun(load_config(ROOT / "conf" / "quickstart.yaml", [*same, f"data.path={data}"]))
    assert stale == [tmp_path / "r" / "base_model", tmp_path / "r" / "tokenizer"]


def test_remote_checkpoints_make_the_folder_count_as_trained(tmp_path):
    # Checkpoints on remote storage cannot be listed here: the run may have trained.
    _run_folder(tmp_path, "cluster.storage_path=s3://bucket/ckpt", trained=False)
    cfg = load_config(
        ROOT / "conf" / "quickstart.yaml",
        [f"output_dir={tmp_path}", "name=r", "cluster.storage_path=s3://bucket/ckpt", "lora.r=4"],
    )
    with pytest.raises(
        UserError, match=r"its run \(checkpoints on s3://bucket/ckpt/r, not listed here\) was made with lora.r="
    ):
        check_rerun(cfg)


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


def test_the_data_fingerprint_follows_content_not_location(tmp_path):
    from raytune_llm.train import driver

    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "train.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert driver._fingerprints([str(a / "train.jsonl")])[0] == driver._fingerprints([str(b / "train.jsonl")])[0]
    (b / "train.jsonl").write_text('{"text": "one"}\n{"text": "tw0"}\n')
    assert driver._fingerprints([str(a / "train.jsonl")])[0] != driver._fingerprints([str(b / "train.jsonl")])[0]
    # a large file by its size, head and tail: an edit near its end changes it
    big = a / "big.jsonl"
    big.write_bytes(b'{"text": "x"}\n' * ((driver._WHOLE // 14) + 10))
    before = driver._fingerprints([str(big)])
    with open(big, "r+b") as f:
        f.seek(-3, 2)
        f.write(b"y")
    assert driver._fingerprints([str(big)]) != before
    # a save_to_disk folder by its files' names and bytes, hidden files aside
    for d in (a, b):
        (d / "hf").mkdir()
        (d / "hf" / "state.json").write_text("{}")
        (d / "hf" / "data-00000-of-00001.arrow").write_bytes(b"arrow bytes")
    (b / "hf" / ".lock").write_text("")
    assert driver._fingerprints([str(a / "hf")])[0] == driver._fingerprints([str(b / "hf")])[0]


def test_a_run_folder_moved_elsewhere_resumes(tmp_path):
    import shutil

    _run_folder(tmp_path / "old")
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    # the saved config names the old output_dir; the copy may go on from where it lies now (an end-to-end copy of a
    # trained quickstart run resumed at its last checkpoint this way, by hand, in session 25)
    moved = load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path / 'new'}", "name=r"])
    assert check_rerun(moved) == []


def test_a_checkpoint_fingerprinted_by_path_before_session_25_still_resumes_in_place(tmp_path):
    import hashlib
    import json
    import os

    from raytune_llm.train import driver
    from raytune_llm.train.resume import check_resumable

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "one"}\n')
    old = hashlib.sha256(f"{os.path.abspath(data)}:{data.stat().st_size}".encode() + data.read_bytes()).hexdigest()[:16]
    new, legacy = driver._fingerprints([str(data)])
    assert legacy == old and new != old
    cfg = load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=r"])
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    state = {"seed": cfg.train.seed, "seq_len": cfg.data.seq_len, "data_fingerprint": old}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    check_resumable(ckpt, cfg, new, legacy)
    data.write_text('{"text": "two"}\n')  # other data under the same path
    with pytest.raises(UserError, match="data_fingerprint"):
        check_resumable(ckpt, cfg, *driver._fingerprints([str(data)]))


def _finished_folder(tmp_path, step=150, *overrides):
    """A run folder as a finished quickstart run leaves it: config, embedded data, summary.json, the final adapter and
    the complete checkpoint it was copied from (the checkpoint's marker as `worker.save_checkpoint` writes it)."""
    import json

    from raytune_llm.train import driver
    from raytune_llm.train.worker import COMPLETE_MARKER, STATE_FILE

    cfg = _run_folder(tmp_path, *overrides)
    run = cfg.run_dir
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text('{"text": "one"}\n')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"final weights")
    ckpt = run / "ray" / "train" / "checkpoint_000002"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"final weights")
    fingerprint = driver._fingerprints([str(run / "data" / "train.jsonl")])[0]
    state = {"step": step, "seed": cfg.train.seed, "seq_len": cfg.data.seq_len, "data_fingerprint": fingerprint}
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    files = {str(f.relative_to(ckpt)): f.stat().st_size for f in ckpt.rglob("*") if f.is_file()}
    (ckpt / COMPLETE_MARKER).write_text(json.dumps(files))
    summary = {"run_dir": str(run), "steps": step, "exports": {}, "wall_s": 80.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return cfg, ckpt


def test_a_finished_run_is_found_only_when_its_folder_holds_the_last_checkpoints_adapter(tmp_path):
    from raytune_llm.train import driver
    from raytune_llm.train.resume import finished_run

    cfg, ckpt = _finished_folder(tmp_path)
    summary, step = finished_run(cfg, driver._fingerprints)
    assert step == 150 and summary["wall_s"] == 80.0
    more = load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=r", "train.max_steps=200"])
    assert finished_run(more, driver._fingerprints) is None  # more steps asked for: the resuming path
    # training went on past the folder's adapter (a later checkpoint) and stopped before copying it
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"later weight")
    assert finished_run(cfg, driver._fingerprints) is None
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"final weights")
    (cfg.run_dir / "data" / "train.jsonl").write_text('{"text": "two"}\n')  # the data changed under it
    with pytest.raises(UserError, match="data_fingerprint"):
        finished_run(cfg, driver._fingerprints)


def test_a_finished_run_run_again_exports_only_what_it_lacks(tmp_path, monkeypatch):
    import json

    from raytune_llm.train import finish

    cfg, _ = _finished_folder(tmp_path)
    made = []

    def export(run_dir, fmt, **kw):  # the real exports are the export suite's and test_cli's; here: which ran
        made.append((fmt, kw["dtype"]))
        (run_dir / fmt).mkdir(exist_ok=True)
        return run_dir / fmt

    monkeypatch.setattr("raytune_llm.export.export", export)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    logged = []
    got = finish.finished_again(cfg, summary, 150, logged.append, 0.0)
    assert made == [("adapter", cfg.export.dtype), ("hf", cfg.export.dtype)]
    assert "already trained to step 150" in logged[0] and "exporting adapter, hf" in logged[0]
    saved = json.loads((cfg.run_dir / "summary.json").read_text())
    assert saved["wall_s"] == 80.0 and set(saved["exports"]) == {"adapter", "hf"}  # the training's own time kept
    assert got["exports"] == saved["exports"]
    made.clear()
    again = load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=r"])
    finish.finished_again(again, saved, 150, logged.append, 0.0)
    assert made == [] and "its exports are in place" in logged[-1]
    other = load_config(ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path}", "name=r", "export.dtype=fp32"])
    finish.finished_again(other, saved, 150, logged.append, 0.0)
    assert made == [("adapter", "fp32"), ("hf", "fp32")]  # another dtype: every format again


def test_a_finished_run_forgets_exports_of_other_settings_or_of_another_folder(tmp_path, monkeypatch):
    import json
    import shutil

    from raytune_llm.train import finish

    cfg, _ = _finished_folder(tmp_path / "old")
    made, cut = [], []

    def export(run_dir, fmt, **kw):
        if cut:
            cut.clear()
            raise KeyboardInterrupt  # Ctrl-C in the re-export
        made.append(fmt)
        (run_dir / fmt).mkdir(exist_ok=True)
        return run_dir / fmt

    monkeypatch.setattr("raytune_llm.export.export", export)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    finish.finished_again(cfg, summary, 150, print, 0.0)
    assert made == ["adapter", "hf"]
    fp16 = load_config(
        ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path / 'old'}", "name=r", "export.dtype=fp16"]
    )
    made.clear()
    cut.append(True)
    with pytest.raises(KeyboardInterrupt):
        finish.finished_again(fp16, json.loads((cfg.run_dir / "summary.json").read_text()), 150, print, 0.0)
    assert json.loads((cfg.run_dir / "summary.json").read_text())["exports"] == {}  # the bf16 ones are not fp16's
    finish.finished_again(fp16, json.loads((cfg.run_dir / "summary.json").read_text()), 150, print, 0.0)
    assert made == ["adapter", "hf"]
    shutil.copytree(tmp_path / "old", tmp_path / "new")  # the copy's summary names the old folder's exports
    moved = load_config(
        ROOT / "conf" / "quickstart.yaml", [f"output_dir={tmp_path / 'new'}", "name=r", "export.dtype=fp16"]
    )
    made.clear()
    got = finish.finished_again(moved, json.loads((moved.run_dir / "summary.json").read_text()), 150, print, 0.0)
    assert made == ["adapter", "hf"] and got["run_dir"] == str(moved.run_dir.resolve())
    assert all(v.startswith(str(moved.run_dir.resolve())) for v in got["exports"].values())
