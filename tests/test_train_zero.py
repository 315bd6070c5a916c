"""`sharding.strategy: zero3` in the main trainer: the quickstart on 2 CPU workers through DeepSpeed.

The loss curve matches the DDP run's (fp32, same data, same LR schedule), the run resumes from its every-rank shards
after a worker is killed past a checkpoint, and the adapter gathered for export loads with PEFT. ZeRO-2 has no run of
its own here: the trainer's DeepSpeed path differs between the stages only in the stage number it passes to
`sharding.zero.build_zero_config`, and ZeRO-2 itself (losses and gathered LoRA against DDP, resume) is proven in 2 Ray
workers by tests/sharding/test_ray_zero.py. One 2-worker trainer run (~50 s on the 2-core machine) less.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytune_llm.config import ConfigError, load_config
from raytune_llm.train.driver import UserError, run_training
from raytune_llm.train.worker import is_complete, latest_complete
from tests._runs import TWO_WORKERS, assert_resumed_from, logged_losses, small_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = TWO_WORKERS  # the config of the session's DDP reference run (conftest.ddp_two_workers)


def _cfg(out: Path, name: str, *extra: str):
    return small_config(out, name, SMALL, *extra)


_losses = logged_losses


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("zero")


@pytest.fixture(scope="module")
def ddp_losses(ddp_two_workers):
    return _losses(ddp_two_workers)


@pytest.mark.ray
@pytest.mark.slow
def test_zero3_matches_ddp_resumes_and_adapter_loads(ray_session, out, ddp_losses, monkeypatch):
    """Worker 1 is killed at step 7 and Ray Train restarts the group (train.max_failures=1), which resumes from the
    step-5 checkpoint's every-rank shards: the same 10-step curve also proves the resume, inside one fit (a stopped run
    and a second run cost a Ray Train start-up more)."""
    strategy = "zero3"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RAYTUNE_LLM_FAULT", "kill:rank=1:step=7")
    run_training(_cfg(out, strategy, f"sharding.strategy={strategy}", "train.max_failures=1"))
    run = out / strategy
    assert_resumed_from(run, run / ".fault_fired_1_7", 5)  # the kill happened; steps 6-10 ran after a resume
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 11))  # each step logged once, resumed or not
    for step, want in ddp_losses.items():  # the same curve as the uninterrupted DDP run
        assert abs(losses[step] - want) < 1e-4, (strategy, step, losses[step], want)

    ckpt = latest_complete(run / "ray" / "train")
    assert ckpt is not None and is_complete(ckpt)
    listed = json.loads((ckpt / "COMPLETE").read_text())
    assert any("zero_pp_rank_1" in name for name in listed), sorted(listed)  # rank 1's shards are in the manifest
    assert json.loads((ckpt / "trainer_state.json").read_text())["strategy"] == strategy
    meta = (ckpt / "adapter" / "raytune_llm.json").read_text()  # rank 0's part: exports like the run's adapter
    assert json.loads(meta) == json.loads((run / "adapter" / "raytune_llm.json").read_text())

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run / "base_model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter")
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.numel() > 0 and torch.isfinite(p).all() for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # trained: B left zero init


@pytest.mark.ray
@pytest.mark.slow
def test_zero_refuses_resume_with_another_strategy(ray_session, out):
    if not (out / "zero3").exists():
        run_training(_cfg(out, "zero3", "sharding.strategy=zero3"))
    # Refused before the run folder is touched (driver.check_rerun); check_resumable still guards the checkpoint itself.
    with pytest.raises(UserError, match="made with sharding.strategy='zero3' but this run has sharding.strategy='ddp'"):
        run_training(_cfg(out, "zero3", "sharding.strategy=ddp"))
    with pytest.raises(UserError, match="made with train.num_workers=2 but this run has train.num_workers=1"):
        run_training(_cfg(out, "zero3", "sharding.strategy=zero3", "train.num_workers=1"))


def _auto(tmp_path: Path, hf: dict, *extra: str):
    from raytune_llm.train.sharded import resolve_strategy

    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_config(ROOT / "conf" / "quickstart.yaml", ["sharding.strategy=auto", *extra])
    return resolve_strategy(cfg, tmp_path, world=2)


def test_auto_asks_the_planner(tmp_path):
    from raytune_llm.sharding.planner import LLAMA31_8B, LLAMA31_70B

    shape = ["data.seq_len=2048", "train.micro_batch_size=1", "model.gradient_checkpointing='on'", "quant.bits=4"]
    assert _auto(tmp_path, LLAMA31_8B, *shape) == ("ddp", False, False)
    assert _auto(tmp_path, LLAMA31_70B, *shape, "sharding.gpu_memory_gib=40") == ("zero3", False, False)
    assert _auto(tmp_path, LLAMA31_70B, *shape, "sharding.gpu_memory_gib=24") == ("zero3", True, True)
    with pytest.raises(ValueError, match="sharding.strategy=auto: nothing fits"):
        _auto(tmp_path, LLAMA31_70B, *shape, "sharding.gpu_memory_gib=8")


def test_offload_with_ddp_is_refused(tmp_path):
    from raytune_llm.train.sharded import resolve_strategy

    # Refused by the config itself, before Ray starts; resolve_strategy still refuses what reaches it.
    with pytest.raises(ConfigError, match="offload_optimizer needs sharding.strategy zero2, zero3 or auto"):
        load_config(ROOT / "conf" / "quickstart.yaml", ["sharding.offload_optimizer=true"])
    cfg = load_config(ROOT / "conf" / "quickstart.yaml")
    cfg.sharding.offload_optimizer = True
    with pytest.raises(ValueError, match="need sharding.strategy zero2 or zero3"):
        resolve_strategy(cfg, tmp_path, world=2)
