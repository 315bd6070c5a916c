"""The Ray Train driver: prepare model, tokenizer and data, run the TorchTrainer, then finish the run folder.

`run_training(cfg)` is what `raytune-llm train` calls. It joins the Ray cluster in `RAY_ADDRESS`
(how `ray job submit` runs it) or `cluster.address`, else starts a local one bound to 127.0.0.1,
and checks the worker count against the cluster's CPUs/GPUs before anything heavy starts. The
workers send metrics and checkpoints through `ray.train.report`; everything the run folder gets
at the end (adapter, metrics.jsonl, TensorBoard events, loss-curve PNG, evaluation, exports) is
written by the driver from the last checkpoint, so it works the same when workers are on other
nodes.

Run folder:
    config.yaml        resolved config (secrets redacted)
    base_model/        the tiny model built for the embedded default (absent with model.path)
    tokenizer/         tokenizer trained on the data when neither folder has one
    data/              the bundled task's train.jsonl / eval.jsonl
    adapter/           final adapter (PEFT format) + raytune_llm.json (quantization used in training)
    metrics.jsonl, loss_curve.png, tb/, eval.json, summary.json, exports/<format>/
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytune_llm.config import RunConfig, to_dict
from raytune_llm.config_save import save_config
from raytune_llm.train.errors import StoppedEarly, UserError
from raytune_llm.train.finish import evaluate, export_formats, finished_again, plot_loss, write_tensorboard
from raytune_llm.train.preflight import (
    check_lora_targets,
    check_reachable,
    check_rows,
    has_tokenizer,
    layer_count_notes,
    preflight,
    resolve_data_paths,
)
from raytune_llm.train.resume import check_rerun, check_resumable, finished_run, run_storage

__all__ = ["StoppedEarly", "UserError", "check_rerun", "check_resumable", "run_storage"]  # re-exported


# What stops a run gracefully (the workers save a checkpoint at the step they reached, then stop): SIGTERM (a
# scheduler, `kill`) and Ctrl-C; a second one stops at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop_flag, log=print, get=None):
    """While inside, SIGTERM and Ctrl-C set ``stop_flag`` (the workers save a checkpoint and stop); a second one
    raises KeyboardInterrupt (stop now), and so does the first when no step has run since the run started (the
    workers still loading the model, say: there is nothing new to save, and waiting for the load would be all).
    Yields the names of the signals received. Outside the main thread, which alone may handle signals, it does
    nothing.

    Args:
        stop_flag: `make_stop_flag`'s actor handle (``set.remote()`` answers whether a step has run).
        log: where the one line each signal gets goes.
        get: resolves ``set.remote()``'s answer (``ray.get`` with a timeout; a test passes its own).
    """
    stopping = STOP_SIGNALS if threading_main() else ()
    previous = {sig: signal.getsignal(sig) for sig in stopping}
    received: list[str] = []
    if get is None:
        import ray

        get = lambda ref: ray.get(ref, timeout=10)  # noqa: E731

    def on_stop(signum, frame):  # checkpoint first, then exit: never lose the last steps
        if received:  # a second Ctrl-C / SIGTERM: stop now, the steps since the last checkpoint lost
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        try:
            stepped = get(stop_flag.set.remote())
        except Exception:  # no answer in time: take the path that loses nothing
            stepped = True
        if not stepped:
            log(f"[raytune-llm] {received[0]} before the first step: nothing to save, stopping now")
            raise KeyboardInterrupt
        log(f"[raytune-llm] {received[0]}: asking the workers to save a checkpoint and stop (again: stop now)")

    for sig in stopping:
        signal.signal(sig, on_stop)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class Prepared:
    """What the driver resolved before training."""

    run_dir: Path
    model_path: Path
    tokenizer_path: Path
    data_paths: list[str]
    eval_records: list[dict]
    data_fingerprint: str
    # what the rule before session 25 (absolute path, size, content under 64 MiB) made of the same files: a checkpoint
    # bearing it resumes too, and later checkpoints bear data_fingerprint
    legacy_fingerprint: str = ""


# ------------------------------------------------------------------------------------ preparing


_WHOLE = 64 << 20  # data files under this size are hashed whole; larger ones by their size, head and tail
_EDGE = 1 << 20


def _fingerprints(paths: list[str]) -> tuple[str, str]:
    """Digests of the training data: by content, not by where it lies (a run folder, whose embedded default data sits
    in it, or a data file moved or copied elsewhere still resumes; a changed one does not; a HF `save_to_disk` folder
    counts by its files, not hidden ones, each by name), and by the rule before session 25 (absolute path and size,
    and a file's content under 64 MiB), which checkpoints made then bear. One read of the files for both."""
    new, old = hashlib.sha256(), hashlib.sha256()
    for p in sorted(paths):
        base = Path(p)
        old.update(f"{os.path.abspath(p)}:{os.stat(p).st_size}".encode())
        files = [base] if base.is_file() else sorted(f for f in base.iterdir() if f.is_file() and f.name[0] != ".")
        for f in files:
            size = f.stat().st_size
            new.update(f"{f.name if f != base else ''}:{size}\n".encode())
            with open(f, "rb") as fh:
                if size < _WHOLE:
                    data = fh.read()
                    new.update(data)
                    if f == base:
                        old.update(data)
                else:
                    new.update(fh.read(_EDGE))
                    fh.seek(size - _EDGE)
                    new.update(fh.read(_EDGE))
    return new.hexdigest()[:16], old.hexdigest()[:16]


def prepare(cfg: RunConfig) -> Prepared:
    """Resolve model, tokenizer and data into the run folder (builds the embedded default when asked).

    Raises:
        UserError: a missing model folder, a missing or empty data file.
    """
    from raytune_llm.train import task

    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    eval_records: list[dict] = []
    if cfg.data.path:
        data_paths = resolve_data_paths(cfg.data.path)
    else:
        train, eval_records = task.make_split(cfg.data.num_examples, cfg.data.eval_examples, cfg.train.seed)
        data_paths = [str(task.write_jsonl(train, run_dir / "data" / "train.jsonl"))]
        task.write_jsonl(eval_records, run_dir / "data" / "eval.jsonl")

    if cfg.model.path:
        model_path = Path(os.path.expanduser(cfg.model.path)).resolve()
        if not (model_path / "config.json").is_file():
            raise UserError(f"model.path {cfg.model.path!r} is not a Hugging Face model folder (no config.json)")
    else:
        model_path = run_dir / "base_model"

    tok_path: Path | None = None
    if cfg.model.tokenizer_path:
        tok_path = Path(os.path.expanduser(cfg.model.tokenizer_path)).resolve()
        if not has_tokenizer(tok_path):
            raise UserError(f"model.tokenizer_path {cfg.model.tokenizer_path!r} holds no tokenizer")
    elif cfg.model.path and has_tokenizer(model_path):
        tok_path = model_path
    if tok_path is None:
        tok_path = run_dir / "tokenizer"
        if not has_tokenizer(tok_path):
            from raytune_llm.packing.tokenizer import train_tokenizer

            texts = _texts_for_tokenizer(data_paths, eval_records)
            train_tokenizer(texts, cfg.model.tiny.vocab_size, tok_path)

    if not cfg.model.path and not (model_path / "config.json").exists():
        from transformers import AutoTokenizer

        from raytune_llm.models.tiny import build_tiny_model

        tok = AutoTokenizer.from_pretrained(tok_path)
        t = cfg.model.tiny
        build_tiny_model(
            model_path,
            family="llama",
            vocab_size=len(tok),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            max_position_embeddings=max(512, cfg.data.seq_len),
            seed=cfg.train.seed,
            initializer_range=1.0 / t.hidden_size**0.5,
        )
        tok.save_pretrained(model_path)  # exports and generation find the tokenizer beside the weights
    if not cfg.model.path:  # a user's model was checked by `preflight`, before Ray started
        check_lora_targets(cfg, model_path)
    return Prepared(run_dir, model_path, tok_path, data_paths, eval_records, *_fingerprints(data_paths))


def _texts_for_tokenizer(paths: list[str], eval_records: list[dict], limit: int = 20000) -> list[str]:
    texts: list[str] = []
    for p in paths:
        if not p.endswith((".jsonl", ".json")):
            raise UserError(f"{p}: cannot train a tokenizer from it; set model.tokenizer_path")
        with open(p) as f:
            for line in f:
                if len(texts) >= limit:
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    texts.append(" ".join(_strings(rec)))
    texts += [r["prompt"] + r["completion"] for r in eval_records]
    return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# ------------------------------------------------------------------------------------------ Ray


def start_local_ray(**init_kwargs: Any) -> str:
    """Start a local Ray cluster whose every server listens on loopback only; return the node IP.

    Ray 2.60 has no bind-address setting. Its servers choose loopback themselves when the node IP is
    exactly 127.0.0.1 (the C++ gRPC servers of gcs_server, raylet and core workers through
    `listen_to_localhost_only`; the dashboard agent's gRPC, HTTP and metrics servers, the runtime env
    agent and the metrics ports of the monitor and dashboard head through `is_localhost(node_ip)`),
    and every interface ("::", 0.0.0.0, the machine's IP) otherwise. But `ray.init(_node_ip_address=
    "127.0.0.1")` passes the address through `services.resolve_ip_for_localhost`, which swaps loopback
    for the machine's routable IP unless `ray_constants.ENABLE_RAY_CLUSTER` is off (env
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is imported, which a sweep has done before it
    gets here). So it is turned off for the start only: besides `ray start` only
    `services.get_node_ip_address` reads it, and the daemons get the node IP on their command lines.
    Ray Train's rendezvous store (torch's TCPStore on rank 0, which has no bind address) and gloo's
    sockets follow through `loopback.LoopbackTorchConfig`, which every TorchTrainer of ours takes (NCCL's
    bootstrap sockets do not: see there). `tests/test_reliability.py` lists the sockets, during a fit too.
    """
    import ray
    from ray._private import ray_constants

    kwargs = {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False, **init_kwargs}
    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**kwargs)
    except Exception as exc:  # ray's own startup failures (a GCS or raylet not up in time on a loaded machine)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"a local Ray cluster did not start: {type(exc).__name__}: {first}") from exc
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
    return ray.util.get_node_ip_address()


def connect_ray(cfg: RunConfig) -> str:
    """Join `cluster.address` / RAY_ADDRESS, or start a local cluster listening on loopback only; return how."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    env = dict(cfg.cluster.runtime_env) if cfg.cluster.runtime_env else None
    if address:
        check_reachable(address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return f"joined {address}"
    # Local cluster: every service on loopback, no dashboard (nothing listens on a public address).
    return f"local {start_local_ray(runtime_env=env)}"


def check_resources(cfg: RunConfig) -> bool:
    """Decide whether workers get GPUs and check the cluster can place them; return use_gpu.

    Raises:
        UserError: more workers than GPUs (or CPUs) in the cluster.
    """
    from raytune_llm.train.scale import wait_for_resources

    n = cfg.train.num_workers
    gpus_needed = n if cfg.train.use_gpu == "yes" else 0
    res = wait_for_resources(cfg, gpus_needed, n * cfg.train.cpus_per_worker)
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 0))
    use_gpu = cfg.train.use_gpu == "yes" or (cfg.train.use_gpu == "auto" and gpus > 0)
    if use_gpu and n > gpus:
        waited = f" after {cfg.cluster.scale_up_timeout_s:g} s" if cfg.cluster.scale_up_timeout_s else ""
        raise UserError(
            f"train.num_workers={n} needs {n} GPUs but the cluster has {gpus}{waited}; lower train.num_workers"
            + ("" if waited else " or set cluster.scale_up_timeout_s on an autoscaling cluster")
        )
    need = n * cfg.train.cpus_per_worker
    if need > cpus + 1e-9:
        raise UserError(
            f"train.num_workers={n} x train.cpus_per_worker={cfg.train.cpus_per_worker} needs {need:g} CPUs "
            f"but the cluster has {cpus:g}; lower train.num_workers or train.cpus_per_worker"
        )
    return use_gpu


def record_options(cfg: RunConfig) -> dict[str, Any]:
    """How records become examples, from the run config: the packing layer's format options."""
    return {"format": cfg.data.format, "train_on_prompt": cfg.data.train_on_prompt, "overlong": cfg.data.overlong}


def packed_dataset(cfg: RunConfig, paths: list[str], tokenizer: str, validated_format: str | None = None):
    """The Ray Dataset of packed rows for a run config (the trainer and the sweep's trials): (dataset, stats actor).
    ``validated_format``: the format `preflight` detected while it read every record of ``paths`` (not read again)."""
    from raytune_llm.packing.stream import build_ray_dataset

    return build_ray_dataset(
        paths,
        tokenizer,
        cfg.data.seq_len,
        **{**record_options(cfg), "format": validated_format or cfg.data.format},
        validated=validated_format is not None,
        skip_bad_records=cfg.data.on_bad_record == "skip",
        max_bad_fraction=cfg.data.max_bad_fraction,
        seed=cfg.train.seed,
        num_cpus_per_task=min(1.0, cfg.train.cpus_per_worker),
        pack=cfg.data.pack,
    )


def failure_cause(exc: BaseException) -> str:
    """The most telling line of a Ray Train failure: the worker's own exception, else which worker died."""
    import re

    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    worker = [ln for ln in lines if not ln.startswith(("ray.", "WorkerGroupError"))]
    if worker:
        return worker[-1][:500]
    # No exception text from a worker: its process died (killed, out of memory, crashed). Name the rank
    # from Ray's per-rank failures, whose text may be empty when the process vanished mid-step.
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        parts = []
        for rank, err in sorted(failures.items()):
            detail = " ".join(str(err).split())[:200]
            parts.append(f"rank {rank} ({type(err).__name__}{': ' + detail if detail else ''})")
        return (
            "worker process died without raising an exception (killed, out of memory or crashed): " + "; ".join(parts)
        )[:500]
    rest = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' '.join(rest[:2])}"[:500]


def make_stop_flag():
    """A tiny actor the driver sets on SIGTERM or Ctrl-C (`stop_on_signals`); rank 0 polls it each step, then all
    workers checkpoint and stop. Rank 0 tells it once when its first step is done."""
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        def __init__(self):
            self.value = False
            self.stepped = False

        def set(self) -> bool:
            """Set it; answer whether a step has run since the run started (else there is nothing to save)."""
            self.value = True
            return self.stepped

        def is_set(self) -> bool:
            return self.value

        def step_done(self) -> None:
            self.stepped = True

    return StopFlag.remote()


def fit(
    cfg: RunConfig,
    prep: Prepared,
    use_gpu: bool,
    stop_flag=None,
    received: list[str] | None = None,
    validated_format: str | None = None,
):
    """Build the Ray Dataset and run the TorchTrainer; return the Ray Train Result. With a ``stop_flag``, SIGTERM
    and Ctrl-C during training ask the workers to checkpoint and stop (`stop_on_signals`; their names go to
    ``received``); before it (packing, materialising), a Ctrl-C stops at once. ``validated_format``: see
    `packed_dataset`."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytune_llm.train.loopback import LoopbackTorchConfig
    from raytune_llm.train.worker import train_loop_per_worker

    ds, stats_actor = packed_dataset(cfg, prep.data_paths, str(prep.tokenizer_path), validated_format)
    # Materialise the packed rows once: small next to the model, and it makes every epoch and a
    # resumed run see exactly the same rows in the same order.
    ds = ds.materialize()
    check_rows(cfg, ds.count())
    # One folder per run name under a shared storage_path: two runs must never read each other's checkpoints.
    storage = run_storage(cfg, prep.run_dir)
    if "://" not in storage:
        from raytune_llm.train.worker import latest_complete

        found = latest_complete(Path(storage) / "train")
        if found is not None:
            check_resumable(found, cfg, prep.data_fingerprint, prep.legacy_fingerprint)
            print(f"[raytune-llm] resuming from {found}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "model_path": str(prep.model_path),
            "tokenizer_path": str(prep.tokenizer_path),
            "data_fingerprint": prep.data_fingerprint,
            "legacy_fingerprint": prep.legacy_fingerprint,
            "run_dir": str(prep.run_dir),
            "stop_flag": stop_flag,
            # fault injection for the reliability tests, read on the driver so in-process runs can set it
            "fault": os.environ.get("RAYTUNE_LLM_FAULT"),
            # Ray Train V2 refuses `resume_from_checkpoint` (DeprecationWarning raised in TorchTrainer.__init__):
            # the workers start from the newest complete checkpoint in the run's folder (the one found here, or a
            # newer one after a worker failure).
            "checkpoint_root": str(Path(storage) / "train") if "://" not in storage else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cfg.train.cpus_per_worker},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
        torch_config=LoopbackTorchConfig(),
    )
    if stop_flag is not None and hasattr(trainer, "_register_sigint_handler"):
        # Ray Train's own Ctrl-C handler aborts the run (the steps since the last checkpoint lost, exit status 1, no
        # line from us); stop_on_signals' saves a checkpoint and stops, as on SIGTERM.
        trainer._register_sigint_handler = lambda controller: None
    try:
        with stop_on_signals(stop_flag) if stop_flag is not None else contextlib.nullcontext([]) as got:
            result = trainer.fit()
        if received is not None:
            received.extend(got)
    except Exception as exc:  # Train V2 raises worker errors from fit(): name the cause in one line
        raise RuntimeError(f"training failed: {failure_cause(exc)}") from exc
    try:
        import ray

        data_stats = ray.get(stats_actor.get.remote())
    except Exception:  # stats are informative only
        data_stats = {}
    return result, data_stats


def run_training(cfg: RunConfig, log=print) -> dict:
    """Run one fine-tuning job end to end and return its summary (also written to summary.json).

    Raises:
        UserError: bad input found before training starts.
    """
    t0 = time.time()
    data_checked = preflight(cfg)
    for line in layer_count_notes(cfg):
        log(f"[raytune-llm] {line}")
    for stale in check_rerun(cfg):  # built by an earlier run that never trained, from other settings
        log(f"[raytune-llm] {stale.name}/ was built for other settings by a run that never trained: building it again")
        shutil.rmtree(stale)
    done = finished_run(cfg, _fingerprints)
    if done is not None:
        return finished_again(cfg, *done, log, t0)
    how = connect_ray(cfg)
    use_gpu = check_resources(cfg)  # fail on impossible placements before anything heavy runs
    log(f"[raytune-llm] ray: {how}; {cfg.train.num_workers} worker(s) on {'GPU' if use_gpu else 'CPU'}")
    prep = prepare(cfg)
    log(f"[raytune-llm] run folder {prep.run_dir}")
    before = None
    # Exact match generates from the base weights in model.path, which a random_weights run does not have.
    judge = bool(prep.eval_records) and not cfg.model.random_weights
    if judge:
        before = evaluate(
            prep.model_path, prep.tokenizer_path, prep.eval_records, None, cfg.quant.bits, cfg.quant.double_quant
        )
        log(f"[raytune-llm] exact match before training: {before:.3f} on {len(prep.eval_records)} held-out examples")
    stop_flag, received = make_stop_flag(), []
    from raytune_llm.packing.validate import detected_format

    result, data_stats = fit(cfg, prep, use_gpu, stop_flag, received, validated_format=detected_format(data_checked))
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / "trainer_state.json").read_text())
        if state.get("stopped_early"):
            raise StoppedEarly(
                f"stopped at step {state['step']} on {received[0] if received else 'SIGTERM'}; checkpoint saved in "
                f"{result.checkpoint.path}; "
                "run the same command again to resume"
            )
        adapter = prep.run_dir / "adapter"
        # the folder's summary describes its adapter; a run trained on past it writes a new one once evaluated
        (prep.run_dir / "summary.json").unlink(missing_ok=True)
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.copytree(d / "adapter", adapter)
        shutil.copy(d / "metrics.jsonl", prep.run_dir / "metrics.jsonl")
    from raytune_llm.export.safety import write_run_meta  # not at the top: the export package imports torch

    write_run_meta(adapter, cfg, use_gpu)  # checkpoints carry it too; an adapter from an older one may not
    metrics = [json.loads(x) for x in (prep.run_dir / "metrics.jsonl").read_text().splitlines() if x]
    plot_loss(metrics, prep.run_dir / "loss_curve.png")
    write_tensorboard(metrics, prep.run_dir / "tb")
    after = None
    if judge:
        after = evaluate(
            prep.model_path, prep.tokenizer_path, prep.eval_records, adapter, cfg.quant.bits, cfg.quant.double_quant
        )
        (prep.run_dir / "eval.json").write_text(
            json.dumps({"exact_match_before": before, "exact_match_after": after, "n": len(prep.eval_records)}) + "\n"
        )
    exports: dict[str, str] = {}
    summary = {
        "run_dir": str(prep.run_dir),
        "steps": metrics[-1]["step"] if metrics else 0,
        "first_loss": metrics[0]["loss"] if metrics else None,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "exact_match_before": before,
        "exact_match_after": after,
        "workers": cfg.train.num_workers,
        "use_gpu": use_gpu,
        "data": data_stats,
        "exports": exports,
        "wall_s": round(time.time() - t0, 1),
    }
    summary_path = prep.run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")  # the training is recorded before any export
    export_formats(cfg, prep.run_dir, summary, cfg.export.formats)
    summary["wall_s"] = round(time.time() - t0, 1)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
