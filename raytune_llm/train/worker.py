"""The per-worker training loop that Ray Train runs in each actor (one actor owns one GPU, or CPUs).

Data parallelism is done by hand rather than with DDP: only the LoRA weights train, so after each
backward the workers all-reduce one flat buffer of adapter gradients (a few MB for an 8B model).
That avoids DDP's start-up broadcast of every parameter and buffer, which would include the packed
4-bit base weights, and keeps the arithmetic identical to one worker when the batch is split.

A checkpoint is a folder with the adapter (PEFT format), the optimizer and scheduler states, the
RNG states, the data position and the metrics so far; it is written under a temporary name,
marked complete, and handed to `ray.train.report` from rank 0, which persists it to storage.

`sharding.strategy` zero2 / zero3 (or what `auto` plans) trains the same loop through a DeepSpeed engine
instead; its engine, learning rate, step and every-rank checkpoints are in train/sharded.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


def _dtype(name: str, on_gpu: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to 1, then cosine decay to 0.1 at `total` steps."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _allreduce_grads(params, world: int) -> None:
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = g
        p.grad.copy_(flat[offset : offset + n].view_as(g))  # in place: a recorded step's buffers stay its own
        offset += n


def _manifest(folder: Path) -> dict[str, int]:
    return {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != COMPLETE_MARKER
    }


def is_complete(folder: Path) -> bool:
    """True when `folder` holds a checkpoint whose marker lists every file at its recorded size.

    The marker is written last and names each file with its size, so a checkpoint cut short at any
    moment (while written, or while Ray copies it to storage in whatever order) is never taken.
    """
    marker = folder / COMPLETE_MARKER
    try:
        listed = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(listed, dict) or not listed:
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in listed.items())


def latest_complete(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root` (searched recursively), or None."""
    best: tuple[int, float, Path] | None = None
    for marker in Path(root).rglob(COMPLETE_MARKER):
        folder = marker.parent
        if folder.name.endswith(".partial") or not is_complete(folder):
            continue
        try:
            step = json.loads((folder / STATE_FILE).read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
        key = (step, folder.stat().st_mtime, folder)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def save_checkpoint(
    folder: Path, model, optimizer, scheduler, state: dict, metrics: list[dict], adapter_meta: Callable | None = None
) -> Path:
    """Write a complete checkpoint: files under `<folder>.partial`, then the marker, then one rename.

    `adapter_meta(adapter_folder)`, when given, writes the run's quantization record next to the adapter
    (`export.safety.write_run_meta`), so that the checkpoint exports exactly like the run's final adapter.

    Returns:
        `folder`, which either does not exist or is complete at every instant.
    """
    import torch

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter")
    if adapter_meta is not None:
        adapter_meta(tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    with (tmp / "metrics.jsonl").open("w") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    marker = tmp / (COMPLETE_MARKER + ".tmp")
    marker.write_text(json.dumps(_manifest(tmp)))
    marker.rename(tmp / COMPLETE_MARKER)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> tuple[dict, list[dict]]:
    """Restore adapter, optimizer, scheduler and RNG from a checkpoint folder; return (state, metrics)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not is_complete(folder):
        raise RuntimeError(f"checkpoint {folder} is incomplete (its {COMPLETE_MARKER} manifest does not match)")
    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((folder / STATE_FILE).read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    return state, metrics


def _fault(spec: str | None, rank: int, step: int, run_dir: str) -> str | None:
    """Fault injection for the reliability tests: RAYTUNE_LLM_FAULT="kill:rank=1:step=7" or "nan:step=5".

    A kill fires once per run (a marker file in the run folder remembers it), so the restarted
    worker group trains through. `step` may be a range "3-5" or a list "3,5-7" (one run then takes
    several faults: a skipped NaN step, a good one, then three in a row); "stop" asks for a
    checkpoint-and-stop exactly as SIGTERM to the driver does.
    """
    if not spec:
        return None
    kind, *parts = spec.split(":")
    args = dict(p.split("=", 1) for p in parts)
    ranges = [r.partition("-") for r in args.get("step", "-1").split(",")]
    if not any(int(lo) <= step <= int(hi or lo) for lo, _, hi in ranges) or int(args.get("rank", rank)) != rank:
        return None
    if kind == "kill":
        marker = Path(run_dir) / f".fault_fired_{rank}_{step}"
        if marker.exists():
            return None
        marker.write_text("1")
        return "kill"
    return kind


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: build the model, stream this worker's shard, train, report checkpoints.

    Args:
        loop_config: {"config": resolved RunConfig as a dict, "model_path", "tokenizer_path",
            "data_fingerprint"}; the typed config travels here, never through globals. Optional
            "eval_rows": a list of packed row dicts adds the token-weighted mean loss on them (split
            over the workers) as `eval_loss` to every checkpoint report (what a sweep's ASHA compares).
            Plain rows rather than a Ray dataset: re-splitting one at every report is a Ray Data execution
            each time, and inside a sweep one stalled with its resource budget at zero (Ray 2.60).
            Optional "checkpoint_root": the run's checkpoint folder on local or shared storage; the newest
            complete checkpoint there is where the workers start (a resumed run, or a restarted worker group).
            Optional "legacy_fingerprint": the same data by the fingerprint rule before session 25; a checkpoint
            bearing it resumes too (`driver._fingerprints`).
    """
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from raytune_llm.config import from_dict
    from raytune_llm.export.safety import write_run_meta
    from raytune_llm.models.load import load_model
    from raytune_llm.models.settings import (
        set_checkpoint_layers,
        set_dequantize_once,
        set_keep_mlp_gate_on_host,
        set_keep_mlp_layers,
        set_keep_mlp_layers_on_host,
        set_last_layer_on_device,
        set_mlp_chunk_tokens,
        set_offload_lag,
        set_stash_attention,
    )
    from raytune_llm.packing.stream import iter_torch_batches
    from raytune_llm.sharding.host_memory import check_patched_host_memory
    from raytune_llm.train import sharded as sharded_lib
    from raytune_llm.train.resume import expected_fingerprint

    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    dtype = _dtype(cfg.model.dtype, on_gpu)

    def adapter_meta(folder: Path) -> None:
        write_run_meta(folder, cfg, on_gpu)

    node = ray.get_runtime_context().get_node_id()
    print(f"[raytune-llm] worker rank {rank}/{world} on node {node[:12]} device {device}", flush=True)
    torch.manual_seed(cfg.train.seed)  # the same adapter init on every rank
    # ddp: the all-reduce loop below; zero2/zero3 (or what `auto` plans): a DeepSpeed engine (train/sharded.py)
    strategy, offload_opt, offload_params = sharded_lib.resolve_strategy(cfg, loop_config["model_path"], world)
    zero = strategy != "ddp"
    if rank == 0 and (zero or cfg.sharding.strategy == "auto"):
        print(f"[raytune-llm] sharding: {strategy} (offload optimizer {offload_opt}, params {offload_params})")

    build = dict(
        quantize="nf4" if cfg.quant.bits == 4 else None,
        lora={
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "target_modules": list(cfg.lora.target_modules),
            "use_rslora": cfg.lora.use_rslora,
        },
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        dtype=dtype,
        device=device,
        fused=cfg.model.fused,
        quant_storage=sharded_lib.quant_storage(strategy, dtype, cfg.quant.bits, cfg.quant.storage_dtype)
        if zero
        else torch.uint8,
        double_quant=cfg.quant.double_quant,
    )
    if cfg.model.random_weights:  # drawn on the device, seeded alike on every rank; quantized as they are drawn
        from raytune_llm.models.synthetic import build_synthetic_model
        from raytune_llm.sharding.planner import load_hf_config

        model = build_synthetic_model(load_hf_config(loop_config["model_path"]), seed=cfg.train.seed, **build)
    else:
        model = load_model(loop_config["model_path"], trust_remote_code=cfg.model.trust_remote_code, **build)
    patched = model.raytune_patch_report  # None with fused=False; family None: an architecture left stock
    if patched is not None and patched.family is not None:  # load_model patched with "auto"; the run's setting
        set_mlp_chunk_tokens(model, cfg.model.mlp_chunk_tokens)
        n_ckpt = sharded_lib.resolve_checkpoint_layers(cfg, loop_config["model_path"], strategy, device)
        set_checkpoint_layers(model, n_ckpt)
        if cfg.model.checkpoint_layers == "auto" and rank == 0:
            print(
                f"raytune_llm: model.checkpoint_layers=auto -> {'every layer' if n_ckpt is None else n_ckpt}",
                flush=True,
            )
        set_dequantize_once(model, cfg.model.dequantize_once)
        set_stash_attention(model, cfg.model.stash_attention, o_proj=cfg.model.stash_o_proj)
        set_keep_mlp_layers(model, cfg.model.keep_mlp_layers)
        set_keep_mlp_layers_on_host(model, cfg.model.keep_mlp_layers_on_host)
        set_keep_mlp_gate_on_host(model, cfg.model.keep_mlp_gate_on_host)
        set_offload_lag(model, cfg.model.offload_lag)
        set_last_layer_on_device(model, cfg.model.last_layer_on_device)
        left_off = sharded_lib.apply_host_weights(model, cfg, strategy)
        if left_off and rank == 0:
            print(f"raytune_llm: left off (model.*): {left_off}", flush=True)
        if on_gpu:  # refused in one line before the first step, not killed in it (session 16); every GPU worker
            tokens = cfg.data.seq_len * cfg.train.micro_batch_size  # of this node pins as much
            hf_config = model.config.to_dict()  # the loaded model's own
            act = dtype.itemsize  # fp32 runs pin twice bf16's bytes
            check_patched_host_memory(patched, hf_config, tokens, processes=ctx.get_local_world_size(), act_bytes=act)
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = optimizer = scheduler = None
    if zero:
        sharded = sharded_lib.wrap(model, cfg, strategy, offload_opt, offload_params, dtype, device, world)
        model = sharded.wrapped  # the engine: forward, train() and eval() go through it (ZeRO-3 gathers)
        lr_at = lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps))

    graph_step = None
    if cfg.train.cuda_graph:  # config.py allows it with ddp, fused and no dropout only
        from raytune_llm.models.graphs import CapturedStep

        graph_step = CapturedStep(model, loss_scale=1.0 / cfg.train.grad_accum)
    step, consumed, metrics, nonfinite_run, skipped = 0, 0, [], 0, 0
    resume = ray.train.get_checkpoint()  # this run's own latest (after a worker failure, or V2's restored run)
    if loop_config.get("checkpoint_root"):
        # Ray registers a reported checkpoint only at its next poll of the workers (every 2 s in Ray 2.60): after a
        # worker died sooner than that, the restarted group got an older checkpoint or none and trained those steps
        # again. The newest complete one on storage is never older than Ray's (those are there too).
        # None (no complete checkpoint left, e.g. truncated files): start fresh, as the driver said, rather than
        # take Ray's restored one, which may be that incomplete folder.
        found = latest_complete(Path(loop_config["checkpoint_root"]))
        resume = Checkpoint.from_directory(str(found)) if found is not None else None
    if resume is not None:
        with resume.as_directory() as d:
            if zero:
                state, metrics = sharded_lib.load_zero_checkpoint(Path(d), sharded, strategy, world)
            elif (Path(d) / sharded_lib.SHARDS_DIR).is_dir():
                raise RuntimeError(f"cannot resume: checkpoint {d} holds ZeRO shards but this run is ddp")
            else:
                state, metrics = load_checkpoint(Path(d), model, optimizer, scheduler)
        fingerprint = expected_fingerprint(
            state.get("data_fingerprint"), loop_config["data_fingerprint"], loop_config.get("legacy_fingerprint", "")
        )
        for key in ("seed", "seq_len", "data_fingerprint"):
            want = {"seed": cfg.train.seed, "seq_len": cfg.data.seq_len}.get(key, fingerprint)
            if state.get(key) != want:
                raise RuntimeError(f"cannot resume: checkpoint {key}={state.get(key)!r} but this run has {want!r}")
        step, consumed, skipped = state["step"], state["consumed_batches"], state.get("skipped_steps", 0)
        metrics = [m for m in metrics if m["step"] <= step]
        if rank == 0:
            print(f"[raytune-llm] resumed at step {step} (batch {consumed})", flush=True)

    shard = ray.train.get_dataset_shard("train")
    eval_rows = loop_config.get("eval_rows")
    batch_size = cfg.train.micro_batch_size

    def eval_loss() -> float:
        """Mean loss per trainable token over all eval rows, each rank taking every world-th (a collective)."""
        from raytune_llm.packing.stream import batch_to_tensors

        mine = eval_rows[rank::world]
        sums = torch.zeros(2, device=device, dtype=torch.float64)
        model.eval()
        with torch.no_grad():
            for i in range(0, len(mine), batch_size):
                batch = {k: v.to(device) for k, v in batch_to_tensors(mine[i : i + batch_size]).items()}
                out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
                n = int((batch["labels"][:, 1:] != -100).sum())  # the tokens HF's shifted mean divides by
                if n:
                    sums += torch.tensor([float(out.loss) * n, n], device=device, dtype=torch.float64)
        model.train()
        if world > 1:
            dist.all_reduce(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    def batches():
        seen = 0
        epoch = 0
        while True:
            got = 0
            for batch in iter_torch_batches(shard, batch_size, drop_last=True):
                got += 1
                if seen < consumed:
                    seen += 1
                    continue
                seen += 1
                yield epoch, batch
            if got == 0:
                raise RuntimeError("this worker's data shard is empty: more workers than packed rows")
            epoch += 1

    def report(save: bool) -> None:
        state = {
            "step": step,
            "consumed_batches": consumed,
            "skipped_steps": skipped,
            "seed": cfg.train.seed,
            "seq_len": cfg.data.seq_len,
            "data_fingerprint": loop_config["data_fingerprint"],
            "world_size": world,
            "stopped_early": stopped_early,
        }
        if zero:
            state["strategy"] = strategy
        if eval_rows and metrics:
            metrics[-1]["eval_loss"] = eval_loss()
        last = metrics[-1] if metrics else {"step": step}
        if save and zero:  # every rank writes its shards; Ray merges the ranks' folders into one checkpoint
            with tempfile.TemporaryDirectory() as tmp:
                folder = sharded_lib.save_zero_checkpoint(Path(tmp) / "ckpt", sharded, state, metrics, adapter_meta)
                ray.train.report(last, checkpoint=Checkpoint.from_directory(str(folder)))
        elif save and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                folder = save_checkpoint(Path(tmp) / "ckpt", model, optimizer, scheduler, state, metrics, adapter_meta)
                ray.train.report(last, checkpoint=Checkpoint.from_directory(str(folder)))
        else:
            ray.train.report(last)

    model.train()
    it = batches()
    if on_gpu:  # the logged peak is the training's, not the load's (a ZeRO-3 rank holds the whole base until wrapped)
        torch.cuda.reset_peak_memory_stats(device)
    t_last, tokens_since = time.perf_counter(), 0
    progress = None
    if rank == 0 and os.environ.get("RAYTUNE_LLM_PROGRESS", "1") == "1":
        from tqdm import tqdm

        # Ray forwards every carriage-return update as a log line: update ~20 times per run, not per step.
        every = max(1, cfg.train.max_steps // 20)
        progress = tqdm(
            total=cfg.train.max_steps, initial=step, desc="train", mininterval=5.0, miniters=every, ncols=90
        )
    fault_spec = loop_config.get("fault")
    stop_flag = loop_config.get("stop_flag")
    stopped_early = False
    first_step, told_step_done = step, False

    def tell_step_done() -> None:  # once a step is done, the driver's first Ctrl-C saves it instead of stopping
        nonlocal told_step_done
        if stop_flag is not None and rank == 0 and not told_step_done and step > first_step:
            stop_flag.step_done.remote()
            told_step_done = True

    while step < cfg.train.max_steps:
        tell_step_done()  # steps skipped as non-finite `continue` before the tell below
        if stop_flag is not None:
            # only a "stop" spec is looked at here: _fault consumes a kill (marker file) when it fires
            is_stop = bool(fault_spec) and fault_spec.startswith("stop")
            want = is_stop and _fault(fault_spec, rank, step + 1, loop_config["run_dir"]) == "stop"
            # on the device: NCCL reduces CUDA tensors only (gloo took the host tensor, so only GPUs showed it)
            stop = torch.tensor([float(rank == 0 and (want or ray.get(stop_flag.is_set.remote())))], device=device)
            if world > 1:
                dist.all_reduce(stop)  # every rank stops at the same step
            if stop.item() > 0:
                stopped_early = True
                report(save=True)
                break
        fault = _fault(fault_spec, rank, step + 1, loop_config["run_dir"])
        if fault == "kill":
            os._exit(17)
        if zero:
            epoch, tokens, loss_value, grad_norm = sharded_lib.zero_step(
                sharded, it, cfg.train.lr * lr_at(step), cfg.train.on_nonfinite, step + 1, inject_nan=fault == "nan"
            )
            consumed += cfg.train.grad_accum
            step += 1
            if not math.isfinite(loss_value):  # DeepSpeed skipped the update (zero_step raises where it cannot)
                nonfinite_run += 1
                skipped += 1
                if nonfinite_run >= 3:
                    raise FloatingPointError(f"3 non-finite losses in a row (last at step {step}); aborting")
                continue
            nonfinite_run = 0
        else:
            loss_sum = torch.zeros((), device=device)
            tokens = 0
            epoch = 0
            for _ in range(cfg.train.grad_accum):
                epoch, batch = next(it)
                consumed += 1
                tokens += int((batch["labels"] != -100).sum())  # on the host copy: no device sync
                keys = ("input_ids", "labels", "position_ids")
                if graph_step is not None:  # takes the host tensors (counts packed documents there), copies them
                    loss_sum += graph_step(**{k: batch[k] for k in keys}).loss / cfg.train.grad_accum
                    continue
                batch = {k: batch[k].to(device) for k in keys}
                loss = model(**batch).loss / cfg.train.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            if fault == "nan":
                loss_sum = loss_sum * float("nan")
            loss_value = float(loss_sum)
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=graph_step is None)  # a recorded step keeps its gradient buffers
                if cfg.train.on_nonfinite == "stop":
                    raise FloatingPointError(
                        f"non-finite loss {loss_value} at step {step + 1}; parameters left unchanged"
                    )
                nonfinite_run += 1
                skipped += 1
                if nonfinite_run >= 3:
                    raise FloatingPointError(f"3 non-finite losses in a row (last at step {step + 1}); aborting")
                step += 1
                scheduler.step()
                continue
            nonfinite_run = 0
            if world > 1:
                _allreduce_grads(params, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=graph_step is None)
            step += 1
        tokens_since += tokens * world
        now = time.perf_counter()
        entry = {
            "step": step,
            "loss": loss_value,
            "lr": cfg.train.lr * lr_at(step) if zero else scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "epoch": epoch,
            "trainable_tokens": tokens * world,
            "time": time.time(),
        }
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            entry["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
            if on_gpu:  # the largest of the ranks' peaks since training began (GiB); a collective at log steps only
                peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
                if world > 1:
                    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                entry["gpu_peak_gib"] = round(float(peak), 3)
            if graph_step is not None:  # steps run eagerly so far: packed rows over the recorded step's bounds
                entry["graph_eager_steps"] = graph_step.eager_steps
            t_last, tokens_since = now, 0
        metrics.append(entry)
        tell_step_done()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}")
        if rank == 0 and progress is None and (step % cfg.train.log_every == 0 or step == cfg.train.max_steps):
            print(f"[raytune-llm] step {step} loss {loss_value:.4f} lr {entry['lr']:.2e}", flush=True)
        last = step == cfg.train.max_steps
        if last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
            report(save=True)
    if progress is not None:
        progress.close()
