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


def _run_stack(model: Path, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, str(E2E / "run_stack.py"), "--stack", "std_qlora", "--tiny", "--packed", "--steps", "3"]
    subprocess.run(cmd + ["--model", str(model), "--out", str(out), *flags], check=True, capture_output=True)
    return json.loads(out.read_text())


def test_the_timed_pass_repeats_the_first_passes_updates(tmp_path):
    model = tmp_path / "model"
    subprocess.run([sys.executable, str(E2E / "make_model.py"), "--tiny", "--out", str(model)], check=True)
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
