"""Whether a run may continue what its folder or storage already holds: the same name under other settings, or a
checkpoint of other data, seed or sharding; and where a run's checkpoints live."""

from __future__ import annotations

import filecmp
import json
from collections.abc import Callable
from pathlib import Path

from raytune_llm.config import RunConfig, load_config, to_dict
from raytune_llm.config_save import redact
from raytune_llm.train.errors import UserError

# Settings a run of an existing name may change: how long and how often, where it runs, what it exports.
_RERUN_MAY_CHANGE = (
    # where the run folder lies: a folder moved or copied elsewhere resumes (its data is then checked by content,
    # `check_resumable`'s data_fingerprint; the embedded default's data sits in the folder itself)
    "output_dir",
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.max_failures",
    "train.cpus_per_worker",
    "train.placement_strategy",
    "export.",
    "cluster.",
    "sweep.",
    # Where weights and activations sit, not what is computed: the same gradients (the streamed head's loss to fp32
    # rounding order), so a run may resume with more or less memory.
    "model.embeddings_on_host",
    "model.head_on_host",
    "model.weights_on_host",
    "model.last_layer_on_device",
    "model.keep_mlp_layers",
    "model.keep_mlp_layers_on_host",
    "model.keep_mlp_gate_on_host",
    "model.offload_lag",
    "model.stash_attention",
    "model.stash_o_proj",
    "model.dequantize_once",
)


def run_storage(cfg: RunConfig, run_dir: Path) -> str:
    """Where Ray Train keeps this run's checkpoints: `<cluster.storage_path>/<name>`, else `<run folder>/ray`."""
    return f"{cfg.cluster.storage_path.rstrip('/')}/{cfg.name}" if cfg.cluster.storage_path else str(run_dir / "ray")


def _flat(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix[:-1]: data}
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


# What the base model and tokenizer a run builds for the embedded default are made from (the tokenizer is trained on
# the data; the tiny model's vocabulary, widths, positions and initial weights follow).
_BASE_MADE_FROM = (
    "model.tiny.",
    "model.path",
    "model.tokenizer_path",
    "data.path",
    "data.num_examples",
    "data.eval_examples",
    "data.seq_len",
    "train.seed",
)


def _differ(saved: dict, now: dict, keep=lambda k: True) -> list[str]:
    return [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and keep(k)]


def check_rerun(cfg: RunConfig) -> list[Path]:
    """Refuse, before anything in the run folder is written, to continue a run under settings it was not made with.

    A run folder holding a checkpoint (or the final adapter of a finished run) is resumed; it must then have been
    made with this config, apart from `_RERUN_MAY_CHANGE`. Otherwise the new config.yaml (and the embedded task's
    data) would replace the record of what was trained while the adapter stayed the old one. A folder where nothing
    was trained yet (a run that stopped on bad data, targets or resources) may be run again under any settings.
    With checkpoints on remote storage (which this check cannot list) the folder counts as trained.

    Returns:
        The folders an untrained earlier run built from other settings (`_BASE_MADE_FROM`: its base model and
        tokenizer), which the caller removes so that `prepare` builds them again for this config.

    Raises:
        UserError: naming the first setting that differs.
    """
    from omegaconf import OmegaConf

    run_dir = cfg.run_dir.resolve()
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    storage = run_storage(cfg, run_dir)
    from raytune_llm.train.worker import latest_complete

    remote = "://" in storage
    checkpoint = not remote and latest_complete(Path(storage) / "train") is not None
    adapter = (run_dir / "adapter" / "adapter_config.json").is_file()
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_path)))
    now = _flat(redact(to_dict(cfg)))
    # A setting added since the run was saved took its default then: compare against that, not against None.
    defaults = _flat(redact(to_dict(load_config(None, []))))
    saved = {**{k: v for k, v in defaults.items() if k not in saved and k in now}, **saved}
    if not (checkpoint or adapter or remote):
        if _differ(saved, now, lambda k: k.startswith(_BASE_MADE_FROM)):
            return [p for p in (run_dir / "base_model", run_dir / "tokenizer") if p.is_dir()]
        return []
    differ = _differ(saved, now, lambda k: not k.startswith(_RERUN_MAY_CHANGE))
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        what = (
            "its checkpoint"
            if checkpoint
            else "its adapter"
            if adapter
            else f"its run (checkpoints on {storage}, not listed here)"
        )
        raise UserError(
            f"cannot resume run {cfg.name!r}: {what} was made with {k}={saved.get(k)!r} but this run has "
            f"{k}={now.get(k)!r}{more}; use another name= or the original settings"
        )
    return []


def finished_run(cfg: RunConfig, fingerprints: Callable[[list[str]], tuple[str, str]]) -> tuple[dict, int] | None:
    """(summary, step) of this run when its folder already holds it trained to `train.max_steps`, else None.

    Finished means: its latest checkpoint reached max_steps (not stopped early), the run folder's adapter is that
    checkpoint's, and summary.json exists (the driver writes it once training and evaluation are done). Run again
    with the same settings (`check_rerun` has passed), such a run trains and evaluates nothing; the caller exports
    only what it lacks. None as well with checkpoints on remote storage (not listed here) or the embedded default's
    data missing from the folder: the caller then takes the resuming path.

    Args:
        cfg: the run's config.
        fingerprints: data paths -> (content digest, legacy digest), `driver._fingerprints`.

    Raises:
        UserError: the checkpoint was made from other data, seed or sequence length (`check_resumable`).
    """
    run_dir = cfg.run_dir.resolve()
    storage = run_storage(cfg, run_dir)
    summary_path, adapter = run_dir / "summary.json", run_dir / "adapter" / "adapter_model.safetensors"
    if "://" in storage or not (summary_path.is_file() and adapter.is_file()):
        return None
    from raytune_llm.train.worker import latest_complete

    found = latest_complete(Path(storage) / "train")
    if found is None:
        return None
    state = json.loads((found / "trainer_state.json").read_text())
    kept = found / "adapter" / "adapter_model.safetensors"
    if state.get("stopped_early") or state["step"] < cfg.train.max_steps:
        return None
    if not (kept.is_file() and filecmp.cmp(adapter, kept, shallow=False)):
        return None  # training went on past the adapter the folder holds and stopped before copying it
    if cfg.data.path:
        from raytune_llm.train.preflight import resolve_data_paths

        paths = resolve_data_paths(cfg.data.path)
    else:
        paths = [str(run_dir / "data" / "train.jsonl")]
        if not Path(paths[0]).is_file():
            return None
    check_resumable(found, cfg, *fingerprints(paths))
    try:
        summary = json.loads(summary_path.read_text())
    except ValueError:
        return None
    return summary, state["step"]


def expected_fingerprint(saved: str | None, data_fingerprint: str, legacy_fingerprint: str = "") -> str:
    """The data fingerprint a checkpoint bearing ``saved`` must match: ``legacy_fingerprint`` (the same files by the
    rule before session 25, `driver._fingerprints`) where it is that, else ``data_fingerprint``."""
    return legacy_fingerprint if legacy_fingerprint and saved == legacy_fingerprint else data_fingerprint


def check_resumable(folder: Path, cfg: RunConfig, data_fingerprint: str, legacy_fingerprint: str = "") -> None:
    """Refuse to resume from a checkpoint made with another seed, sequence length, data or sharding strategy.

    ``legacy_fingerprint``: see `expected_fingerprint`.

    Raises:
        UserError: naming the field that differs.
    """
    state = json.loads((folder / "trainer_state.json").read_text())
    fingerprint = expected_fingerprint(state.get("data_fingerprint"), data_fingerprint, legacy_fingerprint)
    now = {"seed": cfg.train.seed, "seq_len": cfg.data.seq_len, "data_fingerprint": fingerprint}
    for key, value in now.items():
        if state.get(key) != value:
            raise UserError(
                f"cannot resume run {cfg.name!r}: its checkpoint has {key}={state.get(key)!r} but this run has "
                f"{key}={value!r}; use another name= or the original settings"
            )
    saved, world = state.get("strategy", "ddp"), state.get("world_size")
    want = cfg.sharding.strategy
    if want != "auto" and (saved != want or (saved != "ddp" and world != cfg.train.num_workers)):
        # ZeRO shards load only into the same stage and number of ranks (the worker checks `auto` runs)
        raise UserError(
            f"cannot resume run {cfg.name!r}: its checkpoint was written by sharding.strategy={saved} on {world} "
            f"workers but this run has {want} on {cfg.train.num_workers}; use another name= or the original settings"
        )
