"""Whether a run may continue what its folder or storage already holds: the same name under other settings, or a
checkpoint of other data, seed or sharding; and where a run's checkpoints live."""

from __future__ import annotations

import json
from pathlib import Path

from raytune_llm.config import RunConfig, redact, to_dict
from raytune_llm.train.errors import UserError

# Settings a run of an existing name may change: how long and how often, where it runs, what it exports.
_RERUN_MAY_CHANGE = (
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.max_failures",
    "train.cpus_per_worker",
    "train.placement_strategy",
    "export.",
    "cluster.",
    "sweep.",
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


def check_rerun(cfg: RunConfig) -> None:
    """Refuse, before anything in the run folder is written, to continue a run under settings it was not made with.

    A run folder holding a checkpoint is resumed, and one holding a base model built by an earlier run reuses it; both
    must then have been made with this config, apart from `_RERUN_MAY_CHANGE`. Otherwise the new config.yaml (and the
    embedded task's data) would replace the record of what was trained while the adapter stayed the old one.

    Raises:
        UserError: naming the first setting that differs.
    """
    from omegaconf import OmegaConf

    run_dir = cfg.run_dir.resolve()
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    storage = run_storage(cfg, run_dir)
    from raytune_llm.train.worker import latest_complete

    checkpoint = "://" not in storage and latest_complete(Path(storage) / "train") is not None
    built = not cfg.model.path and (run_dir / "base_model" / "config.json").is_file()
    if not (checkpoint or built):
        return
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_path)))
    now = _flat(redact(to_dict(cfg)))
    differ = [
        k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and not k.startswith(_RERUN_MAY_CHANGE)
    ]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        what = "its checkpoint" if checkpoint else "its base model"
        raise UserError(
            f"cannot resume run {cfg.name!r}: {what} was made with {k}={saved.get(k)!r} but this run has "
            f"{k}={now.get(k)!r}{more}; use another name= or the original settings"
        )


def check_resumable(folder: Path, cfg: RunConfig, data_fingerprint: str) -> None:
    """Refuse to resume from a checkpoint made with another seed, sequence length, data or sharding strategy.

    Raises:
        UserError: naming the field that differs.
    """
    state = json.loads((folder / "trainer_state.json").read_text())
    now = {"seed": cfg.train.seed, "seq_len": cfg.data.seq_len, "data_fingerprint": data_fingerprint}
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
