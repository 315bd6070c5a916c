"""bench/e2e/run_stack.py --replay-warmup: every step once untimed, the trainable weights and AdamW state put back in
place, then the same steps timed. The timed pass must repeat the first pass's updates, so its losses are those of a
run without the replay (what goals.py compares across calls)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "bench" / "e2e"
sys.path.insert(0, str(E2E))
from run_stack import parse_args  # noqa: E402


def _run_stack(model: Path, out: Path, *flags: str, stack: str = "std_qlora", tiny: bool = True) -> dict:
    cmd = [sys.executable, str(E2E / "run_stack.py"), "--stack", stack, "--packed", "--steps", "3"]
    cmd += ["--tiny"] if tiny else []
    subprocess.run(cmd + ["--model", str(model), "--out", str(out), *flags], check=True, capture_output=True)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """One tiny random Llama folder for the module."""
    out = tmp_path_factory.mktemp("replay") / "model"
    subprocess.run([sys.executable, str(E2E / "make_model.py"), "--tiny", "--out", str(out)], check=True)
    return out


def test_the_timed_pass_repeats_the_first_passes_updates(model, tmp_path):
    plain = _run_stack(model, tmp_path / "plain.json")
    replay = _run_stack(model, tmp_path / "replay.json", "--replay-warmup")
    assert plain["status"] == replay["status"] == "ok" and replay["replay_warmup"] and not plain["replay_warmup"]
    # 1 warm-up and 3 timed steps in each pass; later steps' losses depend on the restored weights and AdamW state
    assert len(replay["replay_pass_ms"]) == len(replay["step_ms_all"]) == 4
    assert replay["replay_pass_losses"] == replay["losses"] == plain["losses"]
    assert replay["replay_loss_max_diff"] == 0.0 and len(set(plain["losses"])) == 4


def test_replay_warmup_refuses_variants(tmp_path, capsys):
    args = ["--stack", "ours", "--tiny", "--model", str(tmp_path), "--out", str(tmp_path / "x.json")]
    parse_args(args + ["--replay-warmup"])
    with pytest.raises(SystemExit):
        parse_args(args + ["--replay-warmup", "--variants", "all"])
    assert "--replay-warmup times one setting" in capsys.readouterr().err


def test_a_resumed_run_with_another_replay_setting_runs_again(model, tmp_path):
    # bench_e2e keeps a resumed file's finished pairs, but not one timed without the replay this call asks for
    out = tmp_path / "e2e.json"
    bench = [sys.executable, str(E2E / "bench_e2e.py"), "--tiny", "--model", str(model), "--stacks", "std_qlora"]
    bench += ["--shapes", "packed_64", "--out", str(out)]
    subprocess.run(bench + ["--replay-warmup", "none"], check=True, capture_output=True)
    first = json.loads(out.read_text())["runs"]["packed_64"]["std_qlora"]
    assert first["status"] == "ok" and not first["replay_warmup"]
    subprocess.run(bench + ["--resume-from", str(out)], check=True, capture_output=True)
    doc = json.loads(out.read_text())
    again = doc["runs"]["packed_64"]["std_qlora"]
    assert (
        again["replay_warmup"] and again["losses"] == first["losses"] and "packed rows: every step" in doc["protocol"]
    )


@pytest.mark.gpu
def test_a_recorded_step_replays_the_same_updates_on_the_gpu(model, tmp_path):
    # ours with its step recorded as a CUDA graph: the first pass captures it, the weights and AdamW's state (on the
    # GPU, capturable) go back in place, and the timed pass replays the graph over the same batches
    flags = ("--seq", "256", "--doc-min", "16", "--doc-max", "96", "--warmup", "2", "--cuda-graph")
    plain = _run_stack(model, tmp_path / "plain.json", *flags, stack="ours", tiny=False)
    replay = _run_stack(model, tmp_path / "replay.json", *flags, "--replay-warmup", stack="ours", tiny=False)
    assert plain["cuda_graph"] and replay["cuda_graph"] and replay["replay_loss_max_diff"] < 2e-3
    assert max(abs(a - b) for a, b in zip(plain["losses"], replay["losses"])) < 2e-3
