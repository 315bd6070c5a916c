"""Data-parallel wrappers for one Ray Train worker: plain DDP or a DeepSpeed ZeRO-2/3 engine.

`wrap_model` turns a (PEFT) model into a `ShardedModel` with one interface over both strategies:
`step(batch) -> loss`, `save(folder)` / `load(folder)` (each rank writes and reads its own shards), and
`gather_trainable_state_dict()` for export, which under ZeRO-3 gathers the partitioned LoRA weights with
`deepspeed.zero.GatheredParameters` into plain CPU tensors on rank 0.

The process group must exist before `wrap_model` (Ray Train's TorchTrainer creates it: gloo on CPU, NCCL on
CUDA); DeepSpeed then reuses it. On CUDA the device is set first, because Ray workers see every GPU in
CUDA_VISIBLE_DEVICES and DeepSpeed would otherwise put every rank on GPU 0.

ZeRO-3 + QLoRA: `check_quant_storage` refuses 4-bit weights whose storage dtype differs from the dtype
ZeRO partitions in. DeepSpeed would cast the packed bytes numerically (bf16 engine: module params are cast
to bf16) and training would run on random weights without any error.

Checkpoints leave frozen parameters out (`exclude_frozen_parameters`): the base model is reloaded from its
own files on resume, and saving a 4-bit 70B base on every checkpoint would write ~35 GB for ~100 MB of LoRA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "zero2", "zero3")
"""Data-parallel strategies `wrap_model` accepts."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DDP_STATE = "ddp_state_rank0.pt"


def _is_4bit(param: torch.Tensor) -> bool:
    # bitsandbytes' Params4bit carries its QuantState on the parameter; duck-typed so this module does not
    # import bitsandbytes (absent or CPU-only on some machines).
    return hasattr(param, "quant_state") or type(param).__name__ == "Params4bit"


def check_quant_storage(model: torch.nn.Module, stage: int, dtype: str) -> None:
    """Refuse a 4-bit base that ZeRO-3 would silently corrupt.

    Args:
        model: the model about to be wrapped.
        stage: ZeRO stage (0 for DDP); only stage 3 partitions the frozen base.
        dtype: the engine's training dtype, "fp32", "bf16" or "fp16".

    Raises:
        ValueError: when stage is 3 and a 4-bit weight is stored in another dtype than `dtype`.
    """
    if stage != 3:
        return
    want = _DTYPES[dtype]
    for name, param in model.named_parameters():
        if _is_4bit(param) and getattr(getattr(param, "quant_state", None), "packing_format_for_cpu", False):
            raise ValueError(
                f"4-bit weight {name} was repacked by bitsandbytes for its CPU kernel (an eval-mode forward on an "
                "AVX512-BF16 CPU); call raytune_llm.models.quantize.keep_nf4_layout(model) right after loading"
            )
        if _is_4bit(param) and param.dtype != want:
            raise ValueError(
                f"ZeRO-3 would corrupt 4-bit weight {name} stored as {param.dtype}: load the model with "
                f"BitsAndBytesConfig(bnb_4bit_quant_storage=torch.{str(want).split('.')[-1]}) to match dtype={dtype}"
            )


def setup_device() -> torch.device:
    """The device this rank trains on; on CUDA also make it the current device.

    Returns:
        `ray.train.torch.get_device()` inside a Ray Train worker, else cuda:LOCAL_RANK when CUDA is present,
        else the CPU.
    """
    try:
        import ray.train.torch as ray_torch

        device = ray_torch.get_device()
    except Exception:  # not inside a Ray Train worker (plain torchrun / multiprocessing / tests)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@dataclass
class ShardedModel:
    """A model wrapped for data-parallel training, with one step/save/load/gather interface.

    Attributes:
        strategy: "ddp", "zero2" or "zero3".
        wrapped: the DistributedDataParallel module or the DeepSpeedEngine.
        module: the unwrapped model (the PEFT model), for forward-only use and names.
        device: the device batches are moved to.
        optimizer: the torch optimizer (DDP only; DeepSpeed owns its optimizer).
        grad_accum: micro-batches per optimizer step.
        grad_clip: max global gradient norm (DDP only; DeepSpeed takes it from its config).
        micro_step: micro-batches seen so far, for DDP's accumulation boundary.
    """

    strategy: str
    wrapped: Any
    module: torch.nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    grad_accum: int = 1
    grad_clip: float = 0.0
    micro_step: int = field(default=0)

    @property
    def is_deepspeed(self) -> bool:
        """Whether a DeepSpeed engine drives this model."""
        return self.strategy != "ddp"

    def step(self, batch: Mapping[str, torch.Tensor]) -> float:
        """Forward, backward and (at an accumulation boundary) optimizer step on one micro-batch.

        Args:
            batch: keyword tensors for the model's forward, including `labels`; moved to `self.device`.

        Returns:
            This rank's loss of the micro-batch, as a float.
        """
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.is_deepspeed:
            loss = self.wrapped(**inputs).loss
            self.wrapped.backward(loss)  # scales by 1/grad_accum and reduces at the boundary
            self.wrapped.step()  # steps the optimizer only at the accumulation boundary
            return float(loss.detach())
        self.micro_step += 1
        boundary = self.micro_step % self.grad_accum == 0
        # no_sync skips the all-reduce on the micro-batches that only accumulate.
        ctx = contextlib.nullcontext() if boundary else self.wrapped.no_sync()
        with ctx:
            loss = self.wrapped(**inputs).loss
            (loss / self.grad_accum).backward()
        if boundary:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(_trainable(self.module), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def save(self, folder: str | os.PathLike, tag: str = "latest", client_state: dict | None = None) -> Path:
        """Write a resumable checkpoint (trainable weights + optimizer) into `folder`; every rank must call.

        Args:
            folder: the checkpoint folder (shared by all ranks; DeepSpeed writes one shard per rank).
            tag: sub-folder name inside `folder`.
            client_state: small picklable extras (step, data position) restored by `load`.

        Returns:
            The folder written.
        """
        folder = Path(folder)
        client_state = dict(client_state or {})
        if self.is_deepspeed:
            self.wrapped.save_checkpoint(
                str(folder), tag=tag, client_state=client_state, exclude_frozen_parameters=True
            )
        else:
            if _rank() == 0:
                (folder / tag).mkdir(parents=True, exist_ok=True)
                state = {
                    "model": {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad},
                    "optimizer": self.optimizer.state_dict(),
                    "micro_step": self.micro_step,
                    "client_state": client_state,
                }
                torch.save(state, folder / tag / _DDP_STATE)
            _barrier()
        return folder

    def load(self, folder: str | os.PathLike, tag: str = "latest") -> dict:
        """Restore a checkpoint written by `save` with the same strategy and world size.

        Args:
            folder: the folder given to `save`.
            tag: the tag given to `save`.

        Returns:
            The client_state saved with it.

        Raises:
            FileNotFoundError: when the folder holds no checkpoint with this tag.
        """
        folder = Path(folder)
        if not (folder / tag).is_dir():
            raise FileNotFoundError(f"no checkpoint {tag!r} in {folder}")
        if self.is_deepspeed:
            # strict=False: frozen weights were left out on save and come from the base model's own files.
            path, client_state = self.wrapped.load_checkpoint(str(folder), tag=tag, load_module_strict=False)
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no loadable checkpoint {tag!r} in {folder}")
            return client_state or {}
        state = torch.load(folder / tag / _DDP_STATE, map_location="cpu", weights_only=True)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_step = state["micro_step"]
        return state["client_state"]

    def gather_trainable_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Full trainable (LoRA) weights as CPU tensors, gathered from ZeRO-3 partitions when needed.

        Every rank must call (the gather is collective). Names are those of `module.named_parameters()`
        (PEFT names such as `...q_proj.lora_A.default.weight`); export maps them to PEFT's file format.

        Args:
            rank0_only: return an empty dict on ranks other than 0 instead of a copy on every rank.

        Returns:
            name -> full tensor on CPU (cloned, safe to keep after training continues).
        """
        keep = not rank0_only or _rank() == 0
        out: dict[str, torch.Tensor] = {}
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            with _gathered([param]):
                if keep:
                    out[name] = param.detach().to("cpu", copy=True)
        return out


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gathered(params: list[torch.nn.Parameter]):
    # Only ZeRO-3 parameters carry ds_id; for the others (DDP, ZeRO-2, persistent small tensors) the full
    # tensor is already local.
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def wrap_model(
    model: torch.nn.Module,
    strategy: str,
    ds_config: dict | None = None,
    trainable_params: Iterable[torch.nn.Parameter] | None = None,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    dtype: str = "fp32",
    device: torch.device | None = None,
) -> ShardedModel:
    """Wrap a model for data-parallel training on this rank.

    Args:
        model: the model (e.g. a PEFT model); its trainable parameters are those with requires_grad.
        strategy: "ddp", "zero2" or "zero3".
        ds_config: the DeepSpeed config (from `zero.build_zero_config`); required for ZeRO strategies, and its
            stage must match the strategy. Its "optimizer" section (torch AdamW) is used when present,
            otherwise a torch AdamW with `lr` / `weight_decay` is passed as the client optimizer.
        trainable_params: the parameters to optimize; default: all with requires_grad.
        lr: AdamW learning rate for DDP and for the ZeRO client optimizer.
        weight_decay: AdamW weight decay for DDP and for the ZeRO client optimizer.
        grad_accum: micro-batches per optimizer step (DDP; DeepSpeed reads it from ds_config).
        grad_clip: max gradient norm, 0 for none (DDP; DeepSpeed reads it from ds_config).
        dtype: training dtype of the model, checked against 4-bit storage under ZeRO-3.
        device: the device to train on; default `setup_device()`.

    Returns:
        The wrapped model.

    Raises:
        ValueError: on an unknown strategy, a missing or mismatched ds_config, no trainable parameters, or a
            4-bit storage dtype ZeRO-3 would corrupt.
        RuntimeError: when torch.distributed is not initialized.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call wrap_model inside a Ray Train worker")
    params = list(trainable_params) if trainable_params is not None else _trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters (attach LoRA adapters first)")
    device = device or setup_device()

    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model.to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return ShardedModel("ddp", ddp, model, device, optimizer, grad_accum=grad_accum, grad_clip=grad_clip)

    if ds_config is None:
        raise ValueError(f"strategy {strategy!r} needs a DeepSpeed config (sharding.zero.build_zero_config)")
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage != int(strategy[-1]):
        raise ValueError(f"strategy {strategy!r} but ds_config has ZeRO stage {stage}")
    check_quant_storage(model, stage, dtype)

    import deepspeed

    if device.type == "cpu":
        _skip_shm_allreduce_build()
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=ds_config)
    return ShardedModel(strategy, engine, engine.module, engine.device, grad_accum=engine.gradient_accumulation_steps())


def _skip_shm_allreduce_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op on CPU, which ZeRO training never calls.

    On the CPU accelerator DeepSpeed's communication backend JIT-compiles `deepspeed_shm_comm` when it starts
    (measured: 46 s of a 65 s ZeRO-2 + ZeRO-3 run on 2 cores with an empty extension cache; a compiler check in
    every later process). Only `inference_all_reduce` (tensor-parallel inference) uses the op; ZeRO's reductions
    go through torch.distributed. Marking it incompatible in DeepSpeed's op table (which DeepSpeed keeps editable
    for this) makes the backend skip it, as it does where the op cannot build.
    """
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):  # another DeepSpeed layout: it builds the op as before
        pass


def frozen_releaser(engine) -> Callable[[int], None] | None:
    """A callable `release(i)` that partitions again the frozen ZeRO-3 parameters of decoder layer i; None if unavailable.

    DeepSpeed (0.19) attributes the frozen parameters a checkpointed layer's recompute gathers to an outer module
    whose backward is still running, so they stay gathered until the backward of the whole model ends: under QLoRA
    the backward ends holding the entire base gathered on every rank (measured on 2 H200s at 70B shapes: a 55.8 GiB
    peak per GPU where the partitions are about 19 GiB by size). The trainer calls this once layer i's backward is done
    (`models.settings.set_after_layer_backward`); nothing of layer i runs again before the next forward gathers it
    anew. It goes through the coordinator's own release, which skips a parameter still being gathered and keeps its
    count of gathered elements right; the stale module marks the recompute left on them are cleared first.

    Args:
        engine: a DeepSpeed engine at ZeRO stage 3 (layers found by the `.layers.<i>.` in parameter names).

    Returns:
        The callable, or None when this DeepSpeed has no such coordinator method (nothing is released then).
    """
    import re

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    optimizer = getattr(engine, "optimizer", None)
    get = getattr(optimizer, "_get_param_coordinator", None)
    coordinator = get() if callable(get) else None
    release = getattr(coordinator, "_PartitionedParameterCoordinator__release_param", None)
    if release is None:
        return None
    by_layer: dict[int, list[torch.nn.Parameter]] = {}
    for name, p in engine.module.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m and not p.requires_grad and hasattr(p, "ds_id") and not p.ds_persist:
            by_layer.setdefault(int(m.group(1)), []).append(p)

    def run(layer: int) -> None:
        for p in by_layer.get(layer, ()):
            if p.ds_status == ZeroParamStatus.AVAILABLE:
                p.ds_active_sub_modules.clear()
                release(p)

    return run
