"""ZeRO config building, the 4-bit storage guard and wrap_model's argument checks (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.sharding.zero import build_zero_config, quant_storage_dtype_name


@pytest.mark.parametrize(
    "stage,offload_optimizer,offload_params", [(2, False, False), (3, False, False), (2, True, False), (3, True, True)]
)
def test_config_is_accepted_by_deepspeed(monkeypatch, stage, offload_optimizer, offload_params):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = build_zero_config(
        stage, offload_optimizer, offload_params, micro_batch=2, grad_accum=4, dtype="bf16", grad_clip=0.5, world_size=1
    )
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == 8 and parsed.gradient_accumulation_steps == 4
    assert parsed.gradient_clipping == 0.5 and parsed.bfloat16_config.enabled
    assert (parsed.zero_config.offload_optimizer is not None) == offload_optimizer
    assert (parsed.zero_config.offload_param is not None) == offload_params
    # torch AdamW unless offloaded states need DeepSpeed's CPU Adam (a ~74 s JIT build on this machine)
    assert parsed.optimizer_name == "adamw"
    assert parsed.optimizer_params.get("torch_adam", False) == (not offload_optimizer)


def test_client_optimizer_leaves_the_optimizer_out():
    cfg = build_zero_config(2, dtype="fp32", client_optimizer=True)
    assert "optimizer" not in cfg and not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stage=1), "ZeRO stage must be 2 or 3"),
        (dict(stage=2, offload_params=True), "offload_params needs ZeRO stage 3"),
        (dict(stage=3, dtype="fp8"), "dtype must be one of"),
        (dict(stage=3, micro_batch=0), "micro_batch must be a positive integer"),
        (dict(stage=3, offload_optimizer=True, client_optimizer=True), "needs DeepSpeed's CPU Adam"),
        (dict(stage=3, lr=0), "lr must be positive"),
        (dict(stage=3, world_size=0), "world_size must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_zero_config(**kwargs)


def test_quant_storage_dtype_name():
    assert quant_storage_dtype_name(3, "bf16") == "bfloat16"
    assert quant_storage_dtype_name(3, "fp32") == "float32"
    assert quant_storage_dtype_name(2, "bf16") is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        quant_storage_dtype_name(3, "int4")


def _nf4_model(storage: torch.dtype) -> torch.nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
    return torch.nn.Sequential(layer.to("cpu"))  # bitsandbytes quantizes on the move to a device


def test_guard_refuses_uint8_storage_under_zero3():
    from raytune_llm.sharding.engine import check_quant_storage

    model = _nf4_model(torch.uint8)
    assert model[0].weight.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"ZeRO-3 would corrupt 4-bit weight 0\.weight stored as torch\.uint8"):
        check_quant_storage(model, stage=3, dtype="bf16")
    check_quant_storage(model, stage=2, dtype="bf16")  # stage 2 never partitions the frozen base


def test_guard_wants_storage_equal_to_the_engine_dtype():
    from raytune_llm.sharding.engine import check_quant_storage

    model = _nf4_model(torch.float32)
    check_quant_storage(model, stage=3, dtype="fp32")
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage=torch.bfloat16"):
        check_quant_storage(model, stage=3, dtype="bf16")  # a bf16 engine would cast the fp32-packed bytes


def test_wrap_model_needs_a_process_group_and_a_valid_strategy():
    from raytune_llm.sharding.engine import wrap_model

    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="strategy must be one of"):
        wrap_model(model, "fsdp")
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            wrap_model(model, "zero3", build_zero_config(3))
