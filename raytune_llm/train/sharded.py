"""The DeepSpeed ZeRO side of the worker loop: strategy choice, engine config, LR, checkpoints.

`train_loop_per_worker` (worker.py) keeps one loop for every strategy; for `sharding.strategy` zero2 / zero3
(or `auto` when the planner picks one) it calls the helpers here instead of its own AdamW, LambdaLR and
single-writer checkpoint.

Checkpoints of a ZeRO run are written by every rank: each saves its DeepSpeed shards (optimizer state,
and under ZeRO-3 its slice of the LoRA weights) into a local folder and hands that folder to
`ray.train.report`; Ray Train merges the folders of all ranks into one checkpoint directory in storage.
Rank 0 also writes the PEFT adapter (gathered from the partitions), the trainer state, metrics and RNG.
The COMPLETE manifest, written by rank 0, lists the files of every rank (their names and sizes are
all-gathered first), so `worker.is_complete` accepts the merged directory only once every rank's shards
have arrived. A file that several ranks write under the same name (DeepSpeed's model-state file under
ZeRO-3) is kept from the lowest rank only.

The learning rate is set on the engine's optimizer at each optimizer step from `worker.lr_lambda`: the same
warm-up/cosine values the DDP path gets from LambdaLR, with nothing to checkpoint (it is a function of the
step).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

SHARDS_DIR = "zero"
"""Sub-folder of a checkpoint holding DeepSpeed's files."""
SHARDS_TAG = "shards"
"""DeepSpeed checkpoint tag inside SHARDS_DIR."""

_PLANNER_STRATEGY = {
    "DDP": ("ddp", False),
    "ZeRO-2": ("zero2", False),
    "ZeRO-3": ("zero3", False),
    "ZeRO-3+offload": ("zero3", True),
}
_DS_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _plan_args(cfg) -> dict:
    """`plan_from_values` arguments a run config sets (all but the GPUs and checkpoint_layers)."""
    return dict(
        quant_bits=cfg.quant.bits,
        lora_rank=cfg.lora.r,
        lora_targets=list(cfg.lora.target_modules),
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.train.micro_batch_size,
        checkpointing=cfg.model.gradient_checkpointing,
        fused=cfg.model.fused,
        mlp_chunk_tokens=cfg.model.mlp_chunk_tokens,
        dequantize_once=cfg.model.dequantize_once,
        keep_mlp_layers=cfg.model.keep_mlp_layers,
        keep_mlp_layers_on_host=cfg.model.keep_mlp_layers_on_host,
        keep_mlp_gate_on_host=cfg.model.keep_mlp_gate_on_host,
        offload_lag=cfg.model.offload_lag,
        embeddings_on_host=cfg.model.embeddings_on_host,
        head_on_host=cfg.model.head_on_host,
        weights_on_host=cfg.model.weights_on_host,
        stash_attention=cfg.model.stash_attention,
        stash_o_proj=cfg.model.stash_o_proj,
        last_layer_on_device=cfg.model.last_layer_on_device,
    )


def checkpoint_layers_for(cfg, hf_config: dict, gpu_mem_gib: float, strategy: str) -> int | None:
    """`model.checkpoint_layers`, with `auto` resolved: the planner's count for one GPU of `gpu_mem_gib` under DDP
    (`sharding.planner.fewest_checkpointed_layers`; strategy "auto" is planned as DDP, which it picks whenever the
    model fits one GPU), every layer (None) under DeepSpeed."""
    from raytune_llm.sharding.planner import fewest_checkpointed_layers

    if cfg.model.checkpoint_layers != "auto":
        return cfg.model.checkpoint_layers
    if strategy in ("zero2", "zero3"):
        return None
    return fewest_checkpointed_layers(hf_config, gpu_mem_gib=gpu_mem_gib, **_plan_args(cfg))


def plan_for(cfg, hf_config: dict, gpus_per_node: int, nodes: int = 1):
    """The memory planner's plan for a run config (what `raytune-llm plan` prints and `auto` uses)."""
    from raytune_llm.sharding.planner import plan_from_values

    gib = cfg.sharding.gpu_memory_gib
    return plan_from_values(
        hf_config,
        gpu_mem_gib=gib,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        checkpoint_layers=checkpoint_layers_for(cfg, hf_config, gib, cfg.sharding.strategy),
        **_plan_args(cfg),
    )


def resolve_checkpoint_layers(cfg, model_path: str | os.PathLike, strategy: str, device) -> int | None:
    """The checkpointed layer count a worker trains with (`checkpoint_layers_for` with this run's strategy and the
    smaller of `sharding.gpu_memory_gib` and the device's memory); `auto` on a CPU checkpoints every layer."""
    if cfg.model.checkpoint_layers != "auto":
        return cfg.model.checkpoint_layers
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    from raytune_llm.sharding.planner import load_hf_config

    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return checkpoint_layers_for(cfg, load_hf_config(model_path), min(cfg.sharding.gpu_memory_gib, total), strategy)


def resolve_strategy(cfg, model_path: str | os.PathLike, world: int) -> tuple[str, bool, bool]:
    """The strategy this run trains with, and its (offload_optimizer, offload_params) flags.

    `auto` asks the memory planner (sharding.planner) with the run's model, LoRA, sequence length, micro-batch,
    checkpointing and `sharding.gpu_memory_gib`, `world` GPUs on one node.

    Args:
        cfg: the RunConfig.
        model_path: the model folder (its config.json gives the shapes).
        world: number of data-parallel workers.

    Returns:
        (strategy in "ddp" | "zero2" | "zero3", offload_optimizer, offload_params).

    Raises:
        ValueError: `auto` and no strategy fits, or offload flags with strategy ddp.
    """
    s = cfg.sharding
    strategy, offload_opt, offload_params = s.strategy, s.offload_optimizer, s.offload_params
    if strategy == "auto":
        from raytune_llm.sharding.planner import load_hf_config

        plan = plan_for(cfg, load_hf_config(model_path), gpus_per_node=world)
        if not plan.fits:
            raise ValueError(f"sharding.strategy=auto: {plan.reason}")
        strategy, offload = _PLANNER_STRATEGY[plan.strategy]
        offload_opt, offload_params = offload_opt or offload, offload_params or offload
    if strategy == "ddp" and (offload_opt or offload_params):
        raise ValueError("sharding.offload_optimizer/offload_params need sharding.strategy zero2 or zero3 (not ddp)")
    return strategy, offload_opt, offload_params


def apply_host_weights(model, cfg, strategy: str) -> str | None:
    """Apply `model.embeddings_on_host`, `model.head_on_host` and `model.weights_on_host` to a patched model; returns
    why one was left off.

    Left off (the run goes on with the weight on the device) under DeepSpeed, which places every weight itself,
    and for a model whose input embedding and LM head are tied, or a trained one (the setters say which): each
    setting is a memory saving, so a model it cannot serve trains as it would without it.
    """
    from raytune_llm.models.settings import set_embeddings_on_host, set_head_on_host, set_weights_on_host

    why = []
    setters = (set_embeddings_on_host, set_head_on_host, set_weights_on_host)
    for name, setter in zip(("embeddings_on_host", "head_on_host", "weights_on_host"), setters):
        if not getattr(cfg.model, name):
            continue
        if strategy != "ddp":
            why.append(f"{name}: {strategy} places every weight itself")
            continue
        try:
            setter(model, True)
        except ValueError as exc:
            msg = str(exc)
            why.append(msg if msg.startswith(name) else f"{name}: {msg}")
    return "; ".join(why) or None


def ds_dtype(dtype) -> str:
    """DeepSpeed's name ("fp32", "bf16", "fp16") of a torch dtype."""
    return _DS_DTYPE[str(dtype).split(".")[-1]]


def quant_storage(strategy: str, dtype, quant_bits: int, storage_dtype: str = "uint8"):
    """The `load_model(quant_storage=)` dtype of a ZeRO run.

    `quant.storage_dtype` when set; else, under ZeRO-3 with a 4-bit base, the compute dtype (ZeRO-3 moves the
    packed bytes bit for bit only then; `engine.check_quant_storage` refuses a mismatch); else uint8.
    """
    import torch

    from raytune_llm.sharding.zero import quant_storage_dtype_name

    if quant_bits != 4:
        return torch.uint8
    if storage_dtype != "uint8":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[storage_dtype]
    name = quant_storage_dtype_name(3 if strategy == "zero3" else 0, ds_dtype(dtype))
    return getattr(torch, name) if name else torch.uint8


def wrap(model, cfg, strategy: str, offload_opt: bool, offload_params: bool, dtype, device, world: int):
    """Wrap the PEFT model in a DeepSpeed engine configured from the run config; returns a ShardedModel."""
    from raytune_llm.sharding.engine import wrap_model
    from raytune_llm.sharding.zero import build_zero_config

    ds_config = build_zero_config(
        int(strategy[-1]),
        offload_optimizer=offload_opt,
        offload_params=offload_params,
        micro_batch=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum,
        dtype=ds_dtype(dtype),
        grad_clip=cfg.train.grad_clip,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        world_size=world,
    )
    sharded = wrap_model(model, strategy, ds_config, dtype=ds_dtype(dtype), device=device)
    report = getattr(model, "raytune_patch_report", None)  # None: stock (fused=False); family None: left stock
    if strategy == "zero3" and report is not None and report.family is not None:  # our checkpointed layer loop
        from raytune_llm.models.settings import set_after_layer_backward
        from raytune_llm.sharding.engine import frozen_releaser

        release = frozen_releaser(sharded.wrapped)
        if release is not None:
            set_after_layer_backward(model, release)
    return sharded


def set_lr(sharded, lr: float) -> None:
    """Set the learning rate of every parameter group of the engine's optimizer."""
    for group in sharded.wrapped.optimizer.param_groups:
        group["lr"] = lr


def _fsync_all(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def save_zero_checkpoint(folder: Path, sharded, state: dict, metrics: list[dict], adapter_meta=None) -> Path:
    """Every rank: write this rank's part of a checkpoint into `folder` (a local folder per rank).

    Rank 0's part: the PEFT adapter, trainer state, metrics, RNG, its DeepSpeed files and the COMPLETE
    manifest of all ranks' files; the other ranks' part: their DeepSpeed shards. Collective. `adapter_meta` as in
    `train.worker.save_checkpoint` (rank 0 writes it next to the adapter).

    Returns:
        `folder`, which either does not exist or holds this rank's complete part.
    """
    import torch
    import torch.distributed as dist

    from raytune_llm.train.worker import COMPLETE_MARKER, STATE_FILE, _manifest

    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sharded.save(tmp / SHARDS_DIR, tag=SHARDS_TAG, client_state={"step": state["step"]})
    weights = sharded.gather_trainable_state_dict()  # collective; full LoRA weights on rank 0
    if rank == 0:
        sharded.module.save_pretrained(tmp / "adapter", state_dict=weights)
        if adapter_meta is not None:
            adapter_meta(tmp / "adapter")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        with (tmp / "metrics.jsonl").open("w") as f:
            for m in metrics:
                f.write(json.dumps(m) + "\n")
    _fsync_all(tmp)
    manifests: list[Any] = [None] * world
    dist.all_gather_object(manifests, _manifest(tmp))
    merged: dict[str, int] = {}
    for r, files in enumerate(manifests):
        for name, size in files.items():
            if name in merged:
                if r == rank:  # a lower rank reports the same file: Ray must not merge two versions of it
                    (tmp / name).unlink()
                continue
            merged[name] = size
    if rank == 0:
        marker = tmp / (COMPLETE_MARKER + ".tmp")
        marker.write_text(json.dumps(merged))
        marker.rename(tmp / COMPLETE_MARKER)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_zero_checkpoint(folder: Path, sharded, strategy: str, world: int) -> tuple[dict, list[dict]]:
    """Every rank: restore the engine (LoRA weights, optimizer) and RNG; return (trainer state, metrics).

    Raises:
        RuntimeError: an incomplete checkpoint, or one written with another strategy or worker count.
    """
    import torch

    from raytune_llm.train.worker import COMPLETE_MARKER, STATE_FILE, is_complete

    if not is_complete(folder):
        raise RuntimeError(f"checkpoint {folder} is incomplete (its {COMPLETE_MARKER} manifest does not match)")
    state = json.loads((folder / STATE_FILE).read_text())
    saved = state.get("strategy", "ddp")
    if saved != strategy or state.get("world_size") != world:
        raise RuntimeError(
            f"cannot resume: checkpoint {folder} was written by {saved} on {state.get('world_size')} workers but this "
            f"run is {strategy} on {world}; ZeRO shards load only with the same strategy and train.num_workers"
        )
    sharded.load(folder / SHARDS_DIR, tag=SHARDS_TAG)
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch"])
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    return state, metrics


def zero_step(sharded, batches, lr: float, on_nonfinite: str, step: int, inject_nan: bool = False):
    """One optimizer step of the engine over `grad_accum` micro-batches from `batches`; a collective.

    The loss of the step (mean over micro-batches and ranks) is known before the boundary `engine.step()`, so a
    non-finite one stops training with the LoRA weights unchanged. With `on_nonfinite="skip"` the update is left
    to DeepSpeed, which skips a step whose gradient norm is not finite (ZeRO-3 always; ZeRO-2 in fp32/fp16):
    when it did not skip (ZeRO-2 in bf16), this raises rather than train on.

    Args:
        sharded: the ShardedModel from `wrap`.
        batches: iterator of (epoch, batch dict) as the worker's `batches()` yields.
        lr: learning rate of this step.
        on_nonfinite: "stop" or "skip".
        step: the 1-based number of this step (for messages).
        inject_nan: multiply the last micro-batch's loss by NaN before backward (fault injection in tests).

    Returns:
        (epoch, trainable tokens on this rank, loss, gradient norm); the loss is NaN/inf for a skipped step.

    Raises:
        FloatingPointError: a non-finite loss under "stop", or one DeepSpeed applied anyway.
    """
    import torch
    import torch.distributed as dist

    engine = sharded.wrapped
    accum = engine.gradient_accumulation_steps()
    set_lr(sharded, lr)
    loss_sum = torch.zeros((), device=sharded.device)
    tokens, epoch = 0, 0
    for i in range(accum):
        epoch, batch = next(batches)
        batch = {k: v.to(sharded.device) for k, v in batch.items()}
        loss = engine(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss
        if inject_nan and i == accum - 1:
            loss = loss * float("nan")
        engine.backward(loss)  # scales by 1/accum; reduces (ZeRO-2) or reduce-scatters (ZeRO-3) at the boundary
        loss_sum += loss.detach() / accum
        tokens += int((batch["labels"] != -100).sum())
        if i < accum - 1:
            engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
    dist.all_reduce(loss_sum)
    loss_value = float(loss_sum) / dist.get_world_size()
    finite = loss_value == loss_value and abs(loss_value) != float("inf")
    if not finite and on_nonfinite == "stop":
        raise FloatingPointError(f"non-finite loss {loss_value} at step {step}; parameters left unchanged")
    skipped_before = engine.skipped_steps
    engine.step()
    if not finite and engine.skipped_steps == skipped_before:
        raise FloatingPointError(
            f"non-finite loss {loss_value} at step {step} and DeepSpeed applied the update (it checks gradients "
            "for inf/NaN only under ZeRO-3 or in fp32/fp16); use train.on_nonfinite=stop"
        )
    grad_norm = engine.get_global_grad_norm()
    return epoch, tokens, loss_value, float("nan") if grad_norm is None else float(grad_norm)
