"""Bad input through the real command line: one clear line on stderr, no traceback, non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._runs import joining_env

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT, timeout=240, env=None):
    env = env or dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(
        [sys.executable, "-m", "raytune_llm", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def _assert_one_line_error(out, needle: str):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.startswith("raytune-llm: error:")]
    assert lines and needle in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


def test_missing_model_path(tmp_path):
    out = _run("train", "conf/quickstart.yaml", f"model.path={tmp_path}/nope", f"output_dir={tmp_path}")
    _assert_one_line_error(out, "is not a Hugging Face model folder")


def test_lora_targets_the_model_lacks(tmp_path):
    from raytune_llm.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m")
    out = _run(
        "train", "conf/quickstart.yaml", f"model.path={model}", "lora.target_modules=[qkv]", f"output_dir={tmp_path}"
    )
    _assert_one_line_error(out, "lora.target_modules ['qkv'] match no module of this model (its projections: down_proj")


def test_a_model_folder_transformers_cannot_build_is_one_line(tmp_path):
    from raytune_llm.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m")
    config = model / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"model_type": "llama"', '"model_type": "bogus_arch"'))
    out = _run("validate", "conf/quickstart.yaml", f"model.path={model}", timeout=120)
    _assert_one_line_error(out, "transformers cannot build it")
    config.write_text(text[:-20])  # cut short: not JSON any more
    out = _run("validate", "conf/quickstart.yaml", f"model.path={model}", timeout=120)
    _assert_one_line_error(out, "transformers cannot build it")


def test_missing_data_file(tmp_path):
    out = _run("train", "conf/quickstart.yaml", f"data.path={tmp_path}/missing.jsonl", f"output_dir={tmp_path}")
    _assert_one_line_error(out, "no such file or folder")


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = _run("train", "conf/quickstart.yaml", f"data.path={empty}", f"output_dir={tmp_path}")
    _assert_one_line_error(out, "is empty")


def test_config_typo(tmp_path):
    out = _run("train", "conf/quickstart.yaml", "train.max_step=3")
    assert out.returncode == 2 and "did you mean 'train.max_steps'" in out.stderr and "Traceback" not in out.stderr


def test_bad_record_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    out = _run("validate", "conf/quickstart.yaml", f"data.path={data}")
    assert out.returncode == 2, out.stderr
    assert f"{data}:2" in out.stderr and "Traceback" not in out.stderr
    # train reads every record before Ray starts: nothing is built or written for data it cannot use
    out = _run("train", "conf/quickstart.yaml", f"data.path={data}", f"output_dir={tmp_path / 'runs'}", timeout=60)
    _assert_one_line_error(out, f"{data}:2: invalid JSON (Expecting value at column 31)")
    assert not (tmp_path / "runs").exists() and "Ray instance" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "conf/quickstart.yaml", "--nodes", "0"], "--nodes must be a positive integer, got 0"),
        (["plan", "conf/quickstart.yaml", "--gpus-per-node", "0"], "--gpus-per-node must be a positive integer"),
        (["plan", "conf/quickstart.yaml", "lora.target_modules=[foo]"], "lora_targets must be a non-empty subset"),
        (["validate", "conf/quickstart.yaml", "train.lr=.nan"], "train.lr: expected a finite number, got nan"),
        (["validate", "conf/quickstart.yaml", "sharding.gpu_memory_gib=-5"], "gpu_memory_gib must be above 1"),
        (["validate", "conf/quickstart.yaml", "sharding.offload_optimizer=true"], "offload_optimizer needs"),
        (["validate", "conf/sweep_lora.yaml", "sweep.num_samples=0"], "sweep.num_samples: expected an integer >= 1"),
        (["validate", "conf/quickstart.yaml", "model.tokenizer_path=/nonexistent"], "holds no tokenizer"),
        (["validate", "conf/quickstart.yaml", "lora=[1]"], "override 'lora=[1]'"),
        (["validate", "conf"], "is a folder, not a config file"),
        (["validate", "conf/quickstart.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_through_validate_and_plan_is_one_line(args, needle):
    _assert_one_line_error(_run(*args, timeout=60), needle)


def test_bad_files_through_validate_and_plan_are_one_line(tmp_path):
    from raytune_llm.packing.tokenizer import train_tokenizer

    tok = tmp_path / "tok"
    train_tokenizer(["a few words to train on"] * 50, 300, tok)
    csv, parquet, as_list, not_json = (tmp_path / n for n in ("d.csv", "d.parquet", "list.json", "bad.json"))
    csv.write_text("a,b\n")
    parquet.write_bytes(b"PAR1 this is not parquet PAR1")
    as_list.write_text("[1, 2]")
    not_json.write_text("{bad")
    for args, needle in (
        (["validate", "conf/quickstart.yaml", f"data.path={csv}"], "unknown data file type"),
        # no tokenizer to train from it: said before the file is read
        (["validate", "conf/quickstart.yaml", f"data.path={parquet}"], "a tokenizer is trained only from JSONL data"),
        (["validate", "conf/quickstart.yaml", f"data.path={parquet}", f"model.tokenizer_path={tok}"], "not a readable"),
        (["plan", "conf/quickstart.yaml", f"model.path={as_list}"], "a model config must be a JSON object"),
        (["plan", "conf/quickstart.yaml", f"model.path={not_json}"], "not valid JSON"),
    ):
        _assert_one_line_error(_run(*args, timeout=60), needle)


def test_a_gguf_export_the_model_cannot_have_is_refused_before_training(tmp_path):
    from raytune_llm.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m", family="qwen3")
    out = _run(
        "train",
        "conf/quickstart.yaml",
        f"model.path={model}",
        "export.formats=[gguf]",
        f"output_dir={tmp_path}",
        timeout=120,
    )
    _assert_one_line_error(
        out, "export.formats has gguf, which supports model types llama, mistral, qwen2, not 'qwen3'"
    )
    assert not (tmp_path / "quickstart").exists()  # nothing started


def test_a_gguf_export_of_a_tokenizer_llama_cpp_cannot_read_is_refused_before_training(tmp_path):
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from raytune_llm.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m", family="llama")
    # a SentencePiece-style BPE with byte fallback (Mistral-7B's kind), beside the model as a user's would be
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.train_from_iterator(["one two three four"] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model)
    out = _run(
        "train", "conf/quickstart.yaml", f"model.path={model}", "export.formats=[gguf]", f"output_dir={tmp_path}",
        timeout=120,
    )  # fmt: skip
    _assert_one_line_error(out, "GGUF export supports byte-level BPE tokenizers only (not SentencePiece/byte_fallback)")
    assert "export.formats has gguf, but" in out.stderr and not (tmp_path / "quickstart").exists()


def test_overrides_after_an_option_and_a_checked_sweep_section():
    out = _run("plan", "conf/quickstart.yaml", "--shape", "llama-3.1-8b", "data.seq_len=512", timeout=60)
    assert out.returncode in (0, 1) and "unrecognized" not in out.stderr, out.stderr
    assert "tokens=4x512" in out.stdout, out.stdout
    out = _run("validate", "conf/sweep_lora.yaml", timeout=60)
    assert out.returncode == 0 and "sweep: " in out.stdout, (out.stdout, out.stderr)


@pytest.mark.ray
def test_more_workers_than_cpus(ray_session, tmp_path):
    out = _run(
        "train", "conf/quickstart.yaml", "train.num_workers=64", "train.cpus_per_worker=1", f"output_dir={tmp_path}",
        env=joining_env(ray_session),  # the session's 2-CPU cluster: no cluster of its own to start and stop
    )  # fmt: skip
    _assert_one_line_error(out, "train.num_workers=64")
    assert not (tmp_path / "quickstart" / "base_model").exists()  # failed before building anything


@pytest.mark.ray
def test_too_little_data_for_the_workers_fails_before_they_start(ray_session, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "what is 2+2?", "completion": "4"}\n')
    out = _run(
        "train", "conf/quickstart.yaml", f"data.path={data}", "train.max_steps=2", "export.formats=[]",
        f"output_dir={tmp_path}", env=joining_env(ray_session),
    )  # fmt: skip
    _assert_one_line_error(out, "the data makes 1 row(s) of data.seq_len=128 tokens but train.num_workers=2")


def test_validate_refuses_what_train_would_refuse_before_it_starts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "completion": ["b"]}), parquet)
    a_file = tmp_path / "a_file"  # under a file: unwritable even for root
    a_file.write_text("")
    for args, needle in (
        (["lora.target_modules=[foo]"], "lora.target_modules ['foo'] match no module of this model"),
        ([f"data.path={parquet}"], "a tokenizer is trained only from JSONL data; set model.tokenizer_path"),
        (["conf/sweep_lora.yaml", "sweep.eval_path=nope.jsonl"], "sweep.eval_path 'nope.jsonl': no such file"),
        ([f"output_dir={a_file}/runs"], f"cannot write there ({a_file} is not a writable folder)"),
    ):
        config = args[0] if args[0].endswith(".yaml") else "conf/quickstart.yaml"
        overrides = args[1:] if args[0].endswith(".yaml") else args
        _assert_one_line_error(_run("validate", config, *overrides, timeout=60), needle)


def test_the_embedded_models_module_names_are_the_built_models(tmp_path):
    # preflight checks the embedded default's LoRA targets against a fixed list, before the model exists
    from raytune_llm.models.lora import module_leaf_names
    from raytune_llm.models.tiny import build_tiny_model
    from raytune_llm.train.preflight import TINY_MODULE_NAMES

    names = {n for n in module_leaf_names(build_tiny_model(tmp_path / "m")) if n and not n.isdigit()}
    assert names == set(TINY_MODULE_NAMES)


def test_a_home_relative_data_path_and_yaml_syntax_errors(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pc.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    env = dict(os.environ, HOME=str(tmp_path), RAY_AUTH_MODE="token")
    out = _run("validate", "conf/quickstart.yaml", "data.path=~/data/pc.jsonl", env=env, timeout=60)
    assert out.returncode == 0 and "data: 1 records" in out.stdout, out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1\ntrain:\n  seed: 2\n")
    _assert_one_line_error(_run("validate", str(bad), timeout=60), "found duplicate key train at line 3, column 1")


def test_every_problem_of_a_config_is_reported_at_once():
    out = _run("validate", "conf/quickstart.yaml", "lora.r=-1", "lora.dropout=2", "train.lr=-1", "train.grad_clip=-1")
    assert out.returncode == 2 and "4 problem(s)" in out.stderr, out.stderr
    for key in ("lora.r", "lora.dropout", "train.lr", "train.grad_clip"):
        assert f"  {key} must be" in out.stderr


def test_plan_judges_the_configured_strategy():
    # The table is the planner's choice; the verdict and exit status are those of the strategy the run trains with.
    # 70B at 1 x 2048 on two 40 GiB GPUs: the NF4 base does not fit replicated, it does divided by ZeRO-3.
    args = ("plan", "conf/llama3_70b_qlora_zero3.yaml", "--shape", "llama-3.1-70b", "--gpus-per-node", "2")
    out = _run(*args, "sharding.gpu_memory_gib=40", "sharding.strategy=ddp", timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "configured: sharding.strategy=ddp (DDP) 44.31 GiB per GPU, does NOT fit" in out.stdout
    assert "the table above is the plan's choice, ZeRO-3" in out.stdout
    out = _run(*args, "sharding.gpu_memory_gib=40", timeout=60)
    assert out.returncode == 0 and "sharding.strategy=zero3 (ZeRO-3) " in out.stdout, out.stdout
    assert "GiB per GPU, fits the 35.80 GiB usable" in out.stdout and "the table above" not in out.stdout
    # without --shape the model folder's config.json is read; where there is none, the error names --shape
    out = _run("plan", "conf/llama3_70b_qlora_zero3.yaml", "model.path=/nonexistent/70b", timeout=60)
    _assert_one_line_error(out, "no config.json at /nonexistent/70b/config.json (or plan a known shape: --shape")
    # the shipped one-GPU 70B conf passes its own planner
    out = _run("plan", "conf/llama3_70b_qlora_1gpu.yaml", "--shape", "llama-3.1-70b", timeout=60)
    assert out.returncode == 0 and "(DDP) 68.46 GiB per GPU, fits the 72.60 GiB usable\n" in out.stdout, out.stdout


def test_plan_says_how_much_memory_a_node_needs():
    # Session 19's 1x65536 settings (the tables on the GPU, 14 host-kept layers, the last 2 on the device) pin 116.73
    # GiB per GPU worker: torch counted 116.8 on the H200
    # (bench/results/var_1x65536_s19b_lastdev2_keep2_hostkeep14_h200_20261130.json)
    out = _run("plan", "conf/llama3_8b_qlora_64k.yaml", "--shape", "llama-3.1-8b", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "host: 116.73 GiB per GPU worker, 1 per node: a node needs 122.9 GiB of memory or more" in out.stdout
    out = _run("plan", "conf/llama3_8b_qlora_64k.yaml", "--shape", "llama-3.1-8b", "--gpus-per-node", "2", timeout=60)
    assert "2 per node: a node needs 245.8 GiB" in out.stdout, out.stdout
    # a count past what the model takes is capped, as the patched model caps it, and said
    out = _run(
        "plan",
        "conf/llama3_8b_qlora_16k.yaml",
        "--shape",
        "llama-3.1-8b",
        "model.offload_lag=99",
        "model.keep_mlp_layers_on_host=999",
        "model.last_layer_on_device=40",
        timeout=60,
    )
    notes = [line for line in out.stdout.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: model.keep_mlp_layers_on_host=999: 1 here (below the GPU-kept and on-device layers)",
        "note: model.last_layer_on_device=40: 31 here (never layer 0)",
        "note: model.offload_lag=99: 32 here (of the checkpointed layers)",
    ], out.stdout
    out = _run("plan", "conf/llama3_8b_qlora_16k.yaml", "--shape", "llama-3.1-8b", "model.checkpoint_layers=20")
    assert "note: model.last_layer_on_device=2: 0 here (the last layer is not checkpointed)\n" in out.stdout
    out = _run("plan", "conf/quickstart.yaml", timeout=60)  # nothing pinned: no host line; defaults: no note
    assert out.returncode == 0 and "host:" not in out.stdout and "note:" not in out.stdout, out.stdout


def test_validate_says_which_layer_counts_the_model_takes_fewer_of():
    # the embedded model has 2 layers: counts past them are capped (not an error), and validate says so as plan does
    out = _run(
        "validate",
        "conf/quickstart.yaml",
        "model.gradient_checkpointing=offload",
        "model.keep_mlp_layers=5",
        "model.offload_lag=3",
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == [
        "note: model.keep_mlp_layers=5: 2 here (of the checkpointed layers, fused=true)",
        "note: model.offload_lag=3: 2 here (of the checkpointed layers)",
    ], out.stdout
    assert out.stdout.splitlines()[2].startswith("conf/quickstart.yaml: OK")
    out = _run("validate", "conf/quickstart.yaml", timeout=60)
    assert out.returncode == 0 and "note:" not in out.stdout, out.stdout


def test_an_unreachable_cluster_address_fails_in_seconds(tmp_path):
    out = _run("train", "conf/quickstart.yaml", "cluster.address=127.0.0.1:1", f"output_dir={tmp_path}", timeout=60)
    _assert_one_line_error(out, "cluster.address '127.0.0.1:1': nothing answers there")


def test_export_options_that_do_not_apply_are_refused(tmp_path):
    out = _run("export", str(tmp_path), "--format", "gguf", "--dtype", "fp32", timeout=60)
    _assert_one_line_error(out, "--dtype applies to hf and adapter exports")
    out = _run("export", str(tmp_path), "--format", "hf", "--gguf-type", "q8_0", timeout=60)
    _assert_one_line_error(out, "--gguf-type applies to gguf exports, not hf")


def test_a_relative_output_dir_inside_a_ray_job_package_is_refused(tmp_path):
    # `ray job submit --working-dir .` runs the command in a temporary copy Ray deletes with the job.
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    shutil.copytree(ROOT / "conf", pkg / "conf")
    out = _run("validate", "conf/quickstart.yaml", cwd=pkg, timeout=60)
    _assert_one_line_error(out, "output_dir 'runs' is relative: under `ray job submit`")
    out = _run("validate", "conf/quickstart.yaml", f"output_dir={tmp_path}/runs", cwd=pkg, timeout=60)
    assert out.returncode == 0, out.stderr
