"""DeepSpeed ZeRO configs built from plain arguments.

`build_zero_config` returns the dict that `deepspeed.initialize(config=...)` takes. Nothing here imports
torch or deepspeed, so the CLI's `plan` command and config validation can use it without either.

Notable choices:
- The optimizer is torch's AdamW (`"torch_adam": true`) unless the optimizer states are offloaded to the
  CPU: DeepSpeed's CPU Adam JIT-builds in ~74 s on the 2-core CPU machine and ~39 s (FusedAdam) on the
  H200, and for LoRA's few million trainable parameters the fused optimizers buy nothing. ZeRO-Offload
  needs DeepSpeedCPUAdam (DeepSpeed refuses a torch optimizer there unless forced), so offload keeps it.
- ZeRO-3 + QLoRA: the 4-bit base must be stored in a float dtype (`bnb_4bit_quant_storage`) equal to the
  dtype ZeRO partitions; `quant_storage_dtype_name` names it and `engine.check_quant_storage` enforces it,
  because the failure mode is silent (weights become random).
- Parameter offload exists only in stage 3. It is allowed but reported by the planner as a last resort:
  others measured that CPU offload with ZeRO-3 + QLoRA raised GPU memory instead of lowering it.
"""

from __future__ import annotations

from typing import Any

DTYPES = ("fp32", "bf16", "fp16")
"""Training dtypes: the dtype of the DeepSpeed engine's compute and of ZeRO-3's partitions."""

# Bucket sizes in elements. DeepSpeed's defaults (5e8) are sized for full fine-tuning; LoRA's gradients are
# a few million elements in total, so 5e7 (200 MB in fp32) holds all of them in one bucket for 8B and 70B
# models while keeping the transient buffers an order of magnitude smaller than the defaults.
_BUCKET_ELEMENTS = 50_000_000
# ZeRO-3 keeps parameters below this many elements resident on every rank instead of partitioning them
# (norm weights, LoRA A/B of small rank). 1e5 avoids thousands of tiny all-gathers per step; the largest
# LoRA factor for 70B at r=64 is 64 x 28672 = 1.8e6 elements and stays partitioned.
_PERSISTENCE_THRESHOLD = 100_000


def build_zero_config(
    stage: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    micro_batch: int = 1,
    grad_accum: int = 1,
    dtype: str = "bf16",
    grad_clip: float | None = 1.0,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    world_size: int | None = None,
    client_optimizer: bool = False,
    steps_per_print: int = 1_000_000,
) -> dict[str, Any]:
    """Build a DeepSpeed config dict for ZeRO stage 2 or 3.

    Args:
        stage: ZeRO stage, 2 (optimizer states and gradients partitioned) or 3 (parameters too).
        offload_optimizer: keep optimizer states (and the fp32 master copy) in CPU memory (ZeRO-Offload).
        offload_params: keep partitioned parameters in CPU memory (ZeRO-Infinity to CPU); stage 3 only.
        micro_batch: sequences per GPU per forward.
        grad_accum: micro-batches accumulated per optimizer step.
        dtype: "fp32", "bf16" or "fp16" training dtype.
        grad_clip: max global gradient norm, or None / 0 for no clipping.
        lr: AdamW learning rate (ignored when `client_optimizer` is set: the client optimizer has its own).
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        world_size: number of data-parallel ranks; when given, `train_batch_size` is written too so
            DeepSpeed checks the product instead of inferring it.
        client_optimizer: leave the "optimizer" section out because the caller passes its own optimizer
            to `deepspeed.initialize` (not allowed with `offload_optimizer`).
        steps_per_print: DeepSpeed's own progress print interval; large by default because the trainer logs.

    Returns:
        A JSON-serialisable dict for `deepspeed.initialize(config=...)`.

    Raises:
        ValueError: on an unknown stage or dtype, offload of parameters outside stage 3, a client optimizer
            with optimizer offload, or a non-positive batch size, accumulation or learning rate.
    """
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage!r} (use plain DDP for stage 0)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if offload_params and stage != 3:
        raise ValueError("offload_params needs ZeRO stage 3: stage 2 keeps every parameter on every GPU")
    if client_optimizer and offload_optimizer:
        raise ValueError("offload_optimizer needs DeepSpeed's CPU Adam; drop client_optimizer to let it build one")
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr!r}")

    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": _BUCKET_ELEMENTS,
        "allgather_bucket_size": _BUCKET_ELEMENTS,
    }
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": _BUCKET_ELEMENTS,
                "stage3_param_persistence_threshold": _PERSISTENCE_THRESHOLD,
                "stage3_max_live_parameters": 1_000_000_000,
                # Export gathers LoRA weights itself (engine.gather_trainable_state_dict); gathering the whole
                # 16-bit model on every save would materialise the full base on rank 0.
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": steps_per_print,
        "wall_clock_breakdown": False,
    }
    if world_size is not None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        config["train_batch_size"] = micro_batch * grad_accum * world_size
    if not client_optimizer:
        params: dict[str, Any] = {
            "lr": lr,
            "betas": list(betas),
            "eps": eps,
            "weight_decay": weight_decay,
        }
        if not offload_optimizer:
            params["torch_adam"] = True
        config["optimizer"] = {"type": "AdamW", "params": params}
    return config


def quant_storage_dtype_name(stage: int, dtype: str) -> str | None:
    """The `bnb_4bit_quant_storage` a 4-bit base needs under this ZeRO stage.

    ZeRO-3 flattens and partitions every parameter in the engine's dtype; packed NF4 bytes stored as uint8
    would be cast numerically (and so destroyed) instead of being moved bit for bit. Storing them in the
    engine's float dtype makes ZeRO move raw bytes. Stages below 3 never touch the frozen base.

    Args:
        stage: ZeRO stage (0 for plain DDP).
        dtype: the training dtype, one of DTYPES.

    Returns:
        "float32", "bfloat16" or "float16" for stage 3, None otherwise (keep bitsandbytes' uint8 default).

    Raises:
        ValueError: on an unknown dtype.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if stage < 3:
        return None
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
