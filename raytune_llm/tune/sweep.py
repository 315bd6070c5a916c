"""`raytune-llm sweep`: Ray Tune over the Ray Train fine-tuning run, with ASHA and fractional GPUs per trial.

Ray Train V2 does not accept a trainer as a Tune trainable; the pattern is a function trainable
that builds and fits a TorchTrainer and passes the workers' reports up with `TuneReportCallback`.
Each trial here is one such TorchTrainer running the ordinary worker loop (`train.worker`) on the
trial's config: the base config with the sampled dotted keys replaced. The trainable itself asks
Tune for no resources; the trial's workers ask Ray Train for theirs, so `gpus_per_trial: 0.25`
puts four single-worker trials on one GPU and `train.num_workers: 2` makes every trial
data-parallel.

The base model, tokenizer and data are prepared once into the sweep folder and every trial reads
the same packed rows (materialised once in the driver, unless the space varies `data.*`). The
workers report `eval_loss` on held-out rows (packed in the driver, passed in the loop config) at every checkpoint (`sweep.eval_every` steps); ASHA
compares trials on it and stops the ones that trail. A failed trial is recorded and the others
go on. Tune's experiment state and every trial's Ray Train run live in the sweep folder's
storage, so running the same command again resumes an interrupted sweep: finished trials are not
rerun and unfinished ones continue from their last checkpoint.

Sweep folder (output_dir/<name>-sweep/, or cluster.storage_path/<name>-sweep for the Ray state):
    config.yaml, base_model/, tokenizer/, data/   prepared once (as a training run folder)
    sweep.json                                    what the sweep is, to refuse resuming a different one
    tune/                                         Ray Tune experiment (Tuner.restore reads it)
    trials/<trial id>/                            each trial's Ray Train run and checkpoints
    results.csv, results.json, curves.png         trials sorted by the metric
    best/                                         the best trial as a run folder: config.yaml, adapter/,
                                                  metrics.jsonl, exports/adapter/ (PEFT format)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from raytune_llm.config import RunConfig, to_dict
from raytune_llm.train.driver import Prepared, connect_ray, prepare, record_options
from raytune_llm.train.errors import UserError
from raytune_llm.train.preflight import check_lora_targets, check_rows, preflight, resolve_data_paths
from raytune_llm.tune.space import SweepSpec, apply_overrides, param_space, parse_sweep

# Sweep keys that do not change what a trial computes: resuming with other values is allowed (a restored
# Tune experiment keeps its saved search state, so they only apply to trials it has not created yet).
_RESUMABLE_CHANGES = ("max_concurrent_trials", "gpus_per_trial", "resume_errored")
MAX_EVAL_ROWS = 2048
"""Packed held-out rows every evaluation reads (2048 x 2048 tokens is 4M tokens: minutes of forward passes)."""


def sweep_folder(cfg: RunConfig) -> Path:
    """The local sweep folder: output_dir/<name>-sweep."""
    return Path(cfg.output_dir).resolve() / f"{cfg.name}-sweep"


def _storage_root(cfg: RunConfig, folder: Path) -> str:
    if cfg.cluster.storage_path:
        return f"{cfg.cluster.storage_path.rstrip('/')}/{cfg.name}-sweep"
    return str(folder)


def check_trial_resources(cfg: RunConfig, spec: SweepSpec) -> tuple[bool, dict[str, float]]:
    """Decide GPU or CPU workers and each worker's resources; check one trial fits the cluster.

    Returns:
        (use_gpu, resources_per_worker).

    Raises:
        UserError: a single trial needs more GPUs or CPUs than the cluster has.
    """
    from raytune_llm.train.scale import wait_for_resources

    n = cfg.train.num_workers
    trial_gpus = spec.gpus_per_trial if spec.gpus_per_trial is not None else float(n)
    res = wait_for_resources(cfg, trial_gpus if cfg.train.use_gpu == "yes" else 0, n * cfg.train.cpus_per_worker)
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    use_gpu = cfg.train.use_gpu == "yes" or (cfg.train.use_gpu == "auto" and gpus > 0)
    per_worker: dict[str, float] = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = trial_gpus / n
        if n * per_worker["GPU"] > gpus + 1e-9:
            raise UserError(
                f"one trial needs {n * per_worker['GPU']:g} GPUs ({n} worker(s) x {per_worker['GPU']:g}) but the "
                f"cluster has {gpus:g}; lower sweep.gpus_per_trial or train.num_workers"
            )
    if n * cfg.train.cpus_per_worker > cpus + 1e-9:
        raise UserError(
            f"one trial needs {n * cfg.train.cpus_per_worker:g} CPUs (train.num_workers={n} x train.cpus_per_worker="
            f"{cfg.train.cpus_per_worker}) but the cluster has {cpus:g}; lower either"
        )
    return use_gpu, per_worker


def _build_rows(paths: list[str], tokenizer: str, cfg: RunConfig, materialize: bool = True):
    from raytune_llm.train.driver import packed_dataset

    ds, _ = packed_dataset(cfg, paths, tokenizer)
    return ds.materialize() if materialize else ds


def _eval_rows(paths: list[str], tokenizer: str, cfg: RunConfig) -> list[dict]:
    """The held-out data packed into rows in this process (they travel to the workers in the loop config).

    Raises:
        UserError: more than `MAX_EVAL_ROWS` rows (an eval set is a sample, not a second training set).
    """
    from raytune_llm.packing.stream import open_stream

    rows = []
    for row in open_stream(
        paths,
        tokenizer,
        cfg.data.seq_len,
        **record_options(cfg),
        seed=0,
    ):
        rows.append(row)
        if len(rows) > MAX_EVAL_ROWS:
            raise UserError(
                f"sweep eval data {paths[0]!r} packs into more than {MAX_EVAL_ROWS} rows of {cfg.data.seq_len} "
                "tokens; use a smaller held-out sample"
            )
    if not rows:
        raise UserError(f"sweep eval data {paths[0]!r} holds no trainable tokens")
    return rows


class PlacementGroupLedger:
    """Ray actor (named, one per sweep) mapping trial id -> the placement group of its Train workers.

    Ray Train V2 frees a run's placement group from its controller, or, when the controller is killed
    (as when ASHA stops a trial), from a cleaner actor that watches the controller through the State
    API. Without a dashboard (local clusters here start none) that API is down, so an early-stopped
    trial's group and its CPUs/GPUs stayed reserved until the driver exited and later trials never
    started (measured on Ray 2.60: a 2-CPU cluster stalled after two stopped trials). The sweep
    records each trial's group here and releases it when Tune ends the trial.
    """

    def __init__(self):
        self._groups: dict[str, list[str]] = {}

    def add(self, trial_id: str, group_hex: str) -> None:
        self._groups.setdefault(trial_id, []).append(group_hex)

    def pop(self, trial_id: str) -> list[str]:
        return self._groups.pop(trial_id, [])

    def trials(self) -> list[str]:
        return list(self._groups)


def _ledger(name: str):
    import ray

    actor = ray.remote(num_cpus=0)(PlacementGroupLedger)
    return actor.options(name=name, namespace="raytune_llm", get_if_exists=True).remote()


def _trial_worker(loop_config: dict[str, Any]) -> None:
    """The Train worker of a trial: record the worker group's placement group, then the ordinary loop."""
    import ray
    import ray.train

    from raytune_llm.train.worker import train_loop_per_worker

    loop_config = dict(loop_config)
    ledger, trial_id = loop_config.pop("pg_ledger"), loop_config.pop("trial_id")
    group = ray.util.get_current_placement_group()
    if group is not None and ray.train.get_context().get_world_rank() == 0:
        ray.get(_ledger(ledger).add.remote(trial_id, group.id.hex()))
    train_loop_per_worker(loop_config)


def _release_callback(ledger: str):
    """A Tune callback that removes an ended trial's placement group if its controller left it behind."""
    from ray import tune

    class ReleaseTrialResources(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _release(ledger, trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            _release(ledger, trial.trial_id)

    return ReleaseTrialResources()


def _release(ledger: str, trial_id: str) -> None:
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for group_hex in ray.get(_ledger(ledger).pop.remote(trial_id)):
        group = PlacementGroup(PlacementGroupID.from_hex(group_hex))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)


def _run_trial(config: dict[str, Any], *, setup: dict[str, Any], datasets: dict | None) -> None:
    """Tune function trainable: fit one TorchTrainer on the base config with this trial's values."""
    import ray.train
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytune_llm.train.loopback import LoopbackTorchConfig

    cfg = apply_overrides(setup["base"], config)
    # A searched target list fails here, before workers start; against the names the driver read once (reading them
    # here would import transformers into every trial's process).
    check_lora_targets(cfg, Path(setup["model_path"]), set(setup["module_names"]))
    eval_rows = setup["eval_rows"]
    if datasets is None:  # the space varies data.*: pack this trial's rows
        datasets = {"train": _build_rows(setup["data_paths"], setup["tokenizer_path"], cfg)}
        if setup["eval_paths"]:
            eval_rows = _eval_rows(setup["eval_paths"], setup["tokenizer_path"], cfg)
    check_rows(cfg, datasets["train"].count())  # this trial's workers x micro-batch (the space may vary them)
    trial_id = ray.tune.get_context().get_trial_id()
    # A resumed trial continues from its own last complete checkpoint (the worker loop looks in this folder).
    local = "://" not in setup["trials_storage"]
    trainer = TorchTrainer(
        _trial_worker,
        train_loop_config={
            "pg_ledger": setup["pg_ledger"],
            "trial_id": trial_id,
            "config": to_dict(cfg),
            "model_path": setup["model_path"],
            "tokenizer_path": setup["tokenizer_path"],
            "data_fingerprint": setup["data_fingerprint"],
            "legacy_fingerprint": setup["legacy_fingerprint"],
            "run_dir": setup["run_dir"],
            "eval_rows": eval_rows,
            # Ray Train V2 refuses TorchTrainer(resume_from_checkpoint=...): the worker loop takes the folder.
            "checkpoint_root": str(Path(setup["trials_storage"]) / trial_id) if local else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=setup["use_gpu"],
            resources_per_worker=dict(setup["resources_per_worker"]),
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            # The trial id names the run, so a resumed trial finds and continues its own checkpoints.
            name=trial_id,
            storage_path=setup["trials_storage"],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
        datasets=datasets,
        torch_config=LoopbackTorchConfig(),
    )
    trainer.fit()


def _identity(cfg: RunConfig, spec: SweepSpec) -> dict:
    """What must match for a sweep folder to be resumed by this config."""
    base = to_dict(cfg)
    for key in ("sweep", "cluster"):
        base.pop(key)
    sweep = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _RESUMABLE_CHANGES}
    return json.loads(json.dumps({"sweep": sweep, "base": base}))


def _check_same_sweep(folder: Path, identity: dict) -> None:
    saved_path = folder / "sweep.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    diff = [
        f"sweep.{k}"
        for k in sorted(set(saved["sweep"]) | set(identity["sweep"]))
        if saved["sweep"].get(k) != identity["sweep"].get(k)
    ]
    diff += [
        k for k in sorted(set(saved["base"]) | set(identity["base"])) if saved["base"].get(k) != identity["base"].get(k)
    ]
    if diff:
        raise UserError(
            f"{folder} holds a sweep with other settings ({', '.join(diff)}); resume it with the same "
            "config, or use another name (or delete the folder) for a new sweep"
        )


def run_sweep(cfg: RunConfig, log=print) -> str:
    """Run (or resume) the sweep described by `cfg.sweep` and return the results table as text.

    Args:
        cfg: the base run config with its `sweep` section.
        log: where progress lines go.

    Returns:
        The table of trials sorted by the metric (also in results.csv / results.json).

    Raises:
        ConfigError: a bad `sweep` section.
        UserError: bad paths, a trial that cannot fit the cluster, a sweep folder holding another sweep.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from raytune_llm.models.lora import module_leaf_names
    from raytune_llm.tune.results import collect, write_results

    spec = parse_sweep(cfg)
    preflight(cfg)
    eval_paths = resolve_data_paths(spec.eval_path, "sweep.eval_path") if spec.eval_path else []
    how = connect_ray(cfg)
    use_gpu, per_worker = check_trial_resources(cfg, spec)
    folder = sweep_folder(cfg)
    identity = _identity(cfg, spec)
    _check_same_sweep(folder, identity)
    log(
        f"[raytune-llm] ray: {how}; up to {spec.num_trials} trial(s), {spec.max_concurrent_trials} at a time, "
        f"{cfg.train.num_workers} worker(s) each with {per_worker}"
    )
    prep: Prepared = prepare(apply_overrides(cfg, {"output_dir": str(folder.parent), "name": folder.name}))
    log(f"[raytune-llm] sweep folder {folder}")
    if not eval_paths and prep.eval_records:
        eval_paths = [str(prep.run_dir / "data" / "eval.jsonl")]
    datasets, eval_rows = None, None
    if not any(k.startswith("data.") for k in spec.space):
        datasets = {"train": _build_rows(prep.data_paths, str(prep.tokenizer_path), cfg)}
        if eval_paths:
            eval_rows = _eval_rows(eval_paths, str(prep.tokenizer_path), cfg)
    root = _storage_root(cfg, folder)
    base = to_dict(apply_overrides(cfg, {"train.checkpoint_every": spec.eval_every}))
    setup = {
        "base": base,
        "model_path": str(prep.model_path),
        "tokenizer_path": str(prep.tokenizer_path),
        "data_paths": prep.data_paths,
        "eval_paths": eval_paths,
        "eval_rows": eval_rows,
        "data_fingerprint": prep.data_fingerprint,
        "legacy_fingerprint": prep.legacy_fingerprint,
        "run_dir": str(folder),
        "use_gpu": use_gpu,
        "resources_per_worker": per_worker,
        "trials_storage": f"{root}/trials",
        "pg_ledger": f"pg-ledger-{folder.name}-{os.getpid()}",
        "module_names": sorted(module_leaf_names(prep.model_path, cfg.model.trust_remote_code)),
    }
    ledger = _ledger(setup["pg_ledger"])  # held until the end: the actor lives while the driver holds it
    # The trainable only drives the trial's TorchTrainer, whose workers reserve the trial's real resources.
    # Tune refuses an all-zero request ("empty head and zero worker bundles"): a hundredth of a CPU.
    trainable = tune.with_resources(tune.with_parameters(_run_trial, setup=setup, datasets=datasets), {"cpu": 0.01})
    experiment = f"{root}/tune"
    if tune.Tuner.can_restore(experiment):
        log(f"[raytune-llm] resuming the sweep in {experiment}")
        tuner = tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=spec.resume_errored,
            restart_errored=False,
        )
        # The saved run config carries the previous session's callback; this session has its own ledger.
        tuner._local_tuner.get_run_config().callbacks = [_release_callback(setup["pg_ledger"])]
    else:
        scheduler = None
        if spec.scheduler is not None:
            s = spec.scheduler
            scheduler = ASHAScheduler(
                time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                num_samples=spec.num_samples,
                scheduler=scheduler,
                # The generator itself caps concurrency (TuneConfig.max_concurrent_trials is ignored beside it).
                search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials),
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=root,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_release_callback(setup["pg_ledger"])],
                verbose=1,
            ),
        )
        folder.mkdir(parents=True, exist_ok=True)  # recorded once the sweep can start, not before its settings hold
        (folder / "sweep.json").write_text(json.dumps(identity, indent=1) + "\n")
    grid = tuner.fit()
    for trial_id in ray.get(ledger.trials.remote()):  # left by an interruption
        _release(setup["pg_ledger"], trial_id)
    saved = {t.trial_id: t.status for t in tune.ExperimentAnalysis(experiment).trials}
    trials = collect(grid, spec, cfg.train.max_steps, saved)
    return write_results(trials, spec, folder, cfg, use_gpu)
