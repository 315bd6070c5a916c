"""Export safety: outputs stay inside the run folder, writes are atomic, nothing is overwritten without force."""

from __future__ import annotations

import os

import pytest

from raytune_llm.export import ExportError, export

from .conftest import build_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_base):
    return build_run(tmp_path_factory.mktemp("safety") / "run", llama_base)


def _leftovers(folder):
    return [p.name for p in folder.rglob(".*tmp-*")] + [p.name for p in folder.rglob(".*old-*")]


@pytest.mark.parametrize("out", ["../escape", "exports/../../escape", "/tmp/raytune_llm_escape"])
def test_output_outside_run_is_refused(run, out):
    with pytest.raises(ExportError, match=r"'\.\.'|outside the run folder"):
        export(run, "adapter", out=out)
    assert not os.path.exists("/tmp/raytune_llm_escape")


def test_symlinked_output_is_refused(run, tmp_path):
    (run / "linked").symlink_to(tmp_path, target_is_directory=True)
    try:
        with pytest.raises(ExportError, match="symlink"):
            export(run, "adapter", out="linked/adapter")
        assert list(tmp_path.iterdir()) == []
    finally:
        (run / "linked").unlink()


def test_existing_export_needs_force(run):
    out = export(run, "adapter", out="exports/force_check")
    (out / "marker").write_text("old")
    with pytest.raises(ExportError, match="already exists.*force"):
        export(run, "adapter", out="exports/force_check")
    assert (out / "marker").read_text() == "old"
    assert export(run, "adapter", out="exports/force_check", force=True) == out
    assert not (out / "marker").exists() and (out / "adapter_config.json").is_file()
    assert _leftovers(run) == []


def test_failed_export_leaves_nothing(run):
    # Qwen-only tensor names do not exist in a llama base: the merge fails half-way, after the temp folder exists.
    cfg = run / "adapter" / "adapter_config.json"
    bad = run.parent / "bad_run"
    import shutil

    shutil.copytree(run, bad)
    from safetensors.torch import load_file, save_file

    state = load_file(str(bad / "adapter" / "adapter_model.safetensors"))
    state = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    save_file(state, str(bad / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match="does not have"):
        export(bad, "hf")
    assert not (bad / "exports" / "hf").exists() and _leftovers(bad) == []
    assert cfg.is_file()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fmt": "onnx"}, "unknown export format"),
        ({"fmt": "hf", "dtype": "int3"}, "unknown dtype"),
        ({"fmt": "gguf", "gguf_type": "q4_k"}, "unknown GGUF type"),
        ({"fmt": "hf", "out": "adapter"}, "would replace the adapter"),
    ],
)
def test_bad_arguments(run, kwargs, match):
    with pytest.raises(ExportError, match=match):
        export(run, **kwargs)


def test_bad_sources(tmp_path, llama_base):
    with pytest.raises(ExportError, match="not a folder"):
        export(tmp_path / "missing", "hf")
    with pytest.raises(ExportError, match="no adapter_config.json"):
        export(tmp_path, "hf")
    with pytest.raises(ExportError, match="full model folder"):
        export(llama_base, "hf")
    for err in (ExportError("x"),):
        assert "\n" not in str(err)


def test_damaged_adapter_weights_and_a_bad_base_path_are_export_errors(tmp_path, llama_base):
    import json
    import shutil

    src = build_run(tmp_path / "run", llama_base)
    weights = src / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    for fmt in ("adapter", "hf"):
        with pytest.raises(ExportError, match="not a readable safetensors file"):
            export(src, fmt)
    shutil.rmtree(src)
    src = build_run(tmp_path / "run2", llama_base)
    cfg_path = src / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = 5
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="base_model_name_or_path must be a folder path, got 5"):
        export(src, "adapter")


def test_force_never_replaces_the_runs_base_model(tmp_path, llama_base):
    import shutil

    run = build_run(tmp_path / "run", llama_base)
    shutil.copytree(llama_base, run / "base_model")  # a run folder keeps its base beside the adapter
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace(str(llama_base), str(run / "base_model")))
    for out in ("base_model", "base_model/inner", "."):
        with pytest.raises(ExportError, match="base model|adapter being exported|run folder|not an earlier export"):
            export(run, "hf", out=out, force=True)
    assert (run / "base_model" / "config.json").is_file()


def test_force_replaces_earlier_exports_only(tmp_path, llama_base):
    # --force may replace an earlier export; never a checkpoint folder, the tokenizer, the exports folder itself or
    # anything inside the adapter, and a file in the way of --out is one line.
    run = build_run(tmp_path / "run", llama_base)
    for part in ("ray/train/checkpoint_1", "tokenizer", "exports/hf"):
        (run / part).mkdir(parents=True)
        (run / part / "keep").write_text("x")
    for out in ("ray", "tokenizer", "exports", "adapter/merged"):
        with pytest.raises(ExportError, match="not an earlier export|inside the adapter"):
            export(run, "adapter", out=out, force=True)
    assert all((run / p / "keep").is_file() for p in ("ray/train/checkpoint_1", "tokenizer", "exports/hf"))
    assert not (run / "adapter" / "merged").exists()
    assert export(run, "adapter", out="exports/hf", force=True) == run / "exports" / "hf"
    with pytest.raises(ExportError, match="a file is in the way"):
        export(run, "adapter", out="ray/train/checkpoint_1/keep/x")


def test_a_moved_run_folder_exports_with_its_own_base_model(tmp_path, llama_base):
    # adapter_config.json records the base model's absolute path; a run folder copied elsewhere (ray rsync-down)
    # finds its own base_model/ when that path is gone.
    import shutil

    run = build_run(tmp_path / "run", llama_base)
    shutil.copytree(llama_base, run / "base_model")
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace(str(llama_base), str(tmp_path / "gone" / "base_model")))
    assert (export(run, "adapter") / "adapter_config.json").is_file()


def test_gguf_types_are_files_of_one_folder(run):
    # Each GGUF type is its own file: exporting a second type keeps the first; the same type again needs force.
    pytest.importorskip("gguf")
    f16 = export(run, "gguf", out="exports/gguf_types", gguf_type="f16")
    q8 = export(run, "gguf", out="exports/gguf_types", gguf_type="q8_0")
    assert f16.is_file() and q8.is_file() and f16.parent == q8.parent
    with pytest.raises(ExportError, match="already exists.*force"):
        export(run, "gguf", out="exports/gguf_types", gguf_type="q8_0")
    assert export(run, "gguf", out="exports/gguf_types", gguf_type="q8_0", force=True) == q8 and f16.is_file()
    assert _leftovers(run) == []


def test_a_checkpoint_or_an_export_exports_beside_the_runs_own(tmp_path, llama_base):
    # A checkpoint's adapter (or an earlier export's) belongs to the run: its export goes to the run's exports/ under
    # a name of its own, never inside the checkpoint or the export, and never over the run's own exports.
    import shutil

    run = build_run(tmp_path / "run", llama_base)
    ckpt = run / "ray" / "train" / "checkpoint_000004"
    shutil.copytree(run / "adapter", ckpt / "adapter")
    assert export(ckpt, "adapter") == run / "exports" / "adapter-checkpoint_000004"
    own = export(run, "adapter")
    assert own == run / "exports" / "adapter"
    assert export(own, "adapter", dtype="fp32") == run / "exports" / "adapter-adapter"
    assert not (ckpt / "exports").exists() and not (own / "exports").exists()
    shutil.rmtree(run / "adapter")  # a run that stopped before its final adapter
    with pytest.raises(ExportError, match="export one of its checkpoints"):
        export(run, "hf")


def test_a_bare_adapter_folder_exports_into_its_own_exports(tmp_path, llama_base):
    # An adapter folder that belongs to no run (a PEFT adapter from elsewhere) is its own root, as before.
    import shutil

    run = build_run(tmp_path / "run", llama_base)
    bare = shutil.copytree(run / "adapter", tmp_path / "bare")
    assert export(bare, "adapter") == bare / "exports" / "adapter"
    with pytest.raises(ExportError, match="inside the adapter being exported"):
        export(bare, "adapter", out="inner")
