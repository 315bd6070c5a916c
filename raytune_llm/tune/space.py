"""The `sweep` section of a run config: its schema, its validation and the Ray Tune search space it becomes.

A sweep varies keys of the ordinary run config, named by their dotted path:

    sweep:
      space:
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        lora.r: {choice: [8, 16]}
      metric: eval_loss
      num_samples: 4
      max_concurrent_trials: 2
      scheduler: {asha: {grace_period: 2}}

Every key of the space is checked by rebuilding the base config with each candidate value (both
bounds of a range), through the same schema walk `load_config` runs, so an unknown key gets its
full dotted path and a "did you mean", and a bad value the field's own message. Keys that would
change what the trials share (the base model, tokenizer and data files prepared once for the
sweep, the output folders) cannot be swept. Only the standard library is imported here; Ray Tune
objects are built in `param_space`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from raytune_llm.config import ConfigError, RunConfig, from_dict, to_dict

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")
METRICS = ("eval_loss", "loss")
TIME_ATTRS = ("training_iteration", "step")

# Prepared once per sweep and shared by every trial (sweep.run_sweep), or where the sweep writes.
FIXED_PREFIXES = (
    "name",
    "output_dir",
    "model.path",
    "model.tokenizer_path",
    "model.tiny",
    "cluster",
    "export",
    "sweep",
)
FIXED_DATA = ("data.path", "data.format", "data.num_examples", "data.eval_examples", "data.on_bad_record")
FIXED_DATA += ("data.max_bad_fraction",)


@dataclass
class AshaSpec:
    """Asynchronous successive halving: stop trials whose metric trails the others at each rung."""

    grace_period: int = 2
    """Evaluations (or steps, with time_attr=step) every trial runs before it can be stopped."""
    max_t: int | None = None
    """Length of the longest trial in time_attr units; empty: train.max_steps / eval_every."""
    reduction_factor: float = 2.0
    """At each rung only the best 1/reduction_factor of trials continue."""
    time_attr: str = "training_iteration"
    """training_iteration: one unit per evaluation; step: optimizer steps."""


@dataclass
class SweepSpec:
    """The validated `sweep` section."""

    space: dict[str, dict[str, list]] = field(default_factory=dict)
    """Dotted config key -> {choice|grid|uniform|loguniform: values or [low, high]}."""
    metric: str = "eval_loss"
    """eval_loss (held-out data) or loss (training loss of the last step)."""
    mode: str = "min"
    """min or max."""
    num_samples: int = 1
    """Samples drawn from the space (each grid point is repeated this many times)."""
    max_concurrent_trials: int = 1
    """Trials running at once; more wait for resources."""
    gpus_per_trial: float | None = None
    """GPUs per trial, split evenly over its train.num_workers workers (0.25: four trials share a GPU).
    Empty: one GPU per worker. Ignored when the workers run on CPUs."""
    eval_every: int = 10
    """Steps between evaluations; each is a checkpoint and one ASHA time unit."""
    eval_path: str | None = None
    """Held-out JSONL / Parquet for eval_loss; empty: the bundled task's held-out split."""
    scheduler: AshaSpec | None = None
    """ASHA early stopping (scheduler: {asha: {...}}); empty or `fifo`: every trial runs to the end."""
    seed: int | None = 0
    """Seed of the random search (same seed, same sampled configs)."""
    resume_errored: bool = False
    """On resume, retry failed trials from their last checkpoint too (default: keep them failed)."""

    @property
    def grid_size(self) -> int:
        return math.prod(len(d["grid"]) for d in self.space.values() if "grid" in d)

    @property
    def num_trials(self) -> int:
        return self.num_samples * self.grid_size


def _close(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _number(value, key: str, errors: list[str]) -> float | None:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    errors.append(f"{key}: expected a number, got {value!r}")
    return None


def _set_dotted(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def apply_overrides(base: RunConfig | dict, values: dict[str, Any]) -> RunConfig:
    """The base config with dotted keys replaced, validated by the config schema.

    Raises:
        ConfigError: an unknown key (with its dotted path and a "did you mean") or a bad value.
    """
    data = copy.deepcopy(base if isinstance(base, dict) else to_dict(base))
    for key, value in values.items():
        _set_dotted(data, key, value)
    return from_dict(data)


def _check_key(key: str, values: list, base: dict, errors: list[str]) -> None:
    for fixed in FIXED_PREFIXES + FIXED_DATA:
        if key == fixed or key.startswith(fixed + "."):
            errors.append(f"sweep.space: {key!r} cannot be swept (trials share one prepared model, data and folder)")
            return
    for value in values:
        try:
            apply_overrides(base, {key: value})
        except ConfigError as exc:
            errors += [f"sweep.space[{key!r}] = {value!r}: {p}" for p in exc.problems]
            return


def _parse_dist(key: str, spec, base: dict, errors: list[str]) -> dict | None:
    where = f"sweep.space[{key!r}]"
    if not isinstance(spec, dict) or len(spec) != 1:
        errors.append(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
        return None
    ((kind, values),) = spec.items()
    if kind not in DISTRIBUTIONS:
        errors.append(f"{where}: unknown distribution {kind!r}{_close(str(kind), DISTRIBUTIONS)}")
        return None
    if not isinstance(values, list) or not values:
        errors.append(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        return None
    if kind in ("uniform", "loguniform"):
        if len(values) != 2:
            errors.append(f"{where}.{kind}: expected [low, high], got {values!r}")
            return None
        n_before = len(errors)
        lo, hi = (_number(v, f"{where}.{kind}", errors) for v in values)
        if len(errors) > n_before:
            return None
        if not lo < hi:
            errors.append(f"{where}.{kind}: low {lo} must be below high {hi}")
            return None
        if kind == "loguniform" and lo <= 0:
            errors.append(f"{where}.loguniform: bounds must be > 0, got {values!r}")
            return None
        values = [lo, hi]
    n_before = len(errors)
    _check_key(key, values, base, errors)
    if len(errors) == n_before and kind in ("uniform", "loguniform"):
        # A continuous draw lies between the bounds: an integer key (train.max_steps, lora.r) refuses it in every
        # trial, after Ray has started.
        probe = values[0] + (values[1] - values[0]) * 0.4142135
        try:
            apply_overrides(base, {key: probe})
        except ConfigError as exc:
            errors.append(
                f"{where}.{kind}: draws values such as {probe:.4g}, which {key} refuses ({exc.problems[0]}); "
                "use choice or grid"
            )
    return None if len(errors) > n_before else {kind: values}


def _flatten(space: dict, prefix: str = "") -> dict:
    """{train: {lr: {choice: ...}}} (what `sweep.space.train.lr.choice=[...]` overrides give) -> {train.lr: ...}."""
    out = {}
    for key, spec in space.items():
        full = f"{prefix}{key}"
        is_section = isinstance(spec, dict) and spec and all(isinstance(v, dict) for v in spec.values())
        if is_section and not (len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            out.update(_flatten(spec, full + "."))
        else:
            out[full] = spec
    return out


def _build_dataclass(cls, data, where: str, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping, got {data!r}")
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    for k in unknown:
        errors.append(f"unknown key '{where}.{k}'{_close(str(k), names, where + '.')} (allowed: {', '.join(names)})")
    return {k: v for k, v in data.items() if k in names}


def _int(data: dict, key: str, where: str, errors: list[str], minimum: int, allow_none: bool = False):
    value = data.get(key)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        errors.append(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")


def parse_sweep(cfg: RunConfig) -> SweepSpec:
    """Validate `cfg.sweep` against the schema and the base config; return the typed spec.

    Raises:
        ConfigError: every problem found, each naming its `sweep.` key.
    """
    errors: list[str] = []
    raw = dict(cfg.sweep or {})
    if not raw.get("space"):
        errors.append(
            "sweep.space is empty; give at least one key, e.g. sweep.space: {train.lr: {choice: [1e-3, 3e-3]}}"
        )
    kw = _build_dataclass(SweepSpec, raw, "sweep", errors) or {}
    base = to_dict(cfg)
    space = {}
    if isinstance(kw.get("space"), dict):
        for key, spec in _flatten(kw["space"]).items():
            dist = _parse_dist(str(key), spec, base, errors)
            if dist is not None:
                space[str(key)] = dist
    elif kw.get("space") is not None:
        errors.append(f"sweep.space: expected a mapping of dotted keys, got {kw['space']!r}")
    kw["space"] = space
    if kw.get("metric", "eval_loss") not in METRICS:
        m = kw.get("metric")
        errors.append(
            f"sweep.metric: {m!r} is not reported{_close(str(m), METRICS)}; choose one of {', '.join(METRICS)}"
        )
    if kw.get("mode", "min") not in ("min", "max"):
        errors.append(f"sweep.mode: {kw.get('mode')!r}; choose min or max")
    for key in ("num_samples", "max_concurrent_trials", "eval_every"):
        if key in kw:
            _int(kw, key, "sweep", errors, 1)
    if "seed" in kw:
        _int(kw, "seed", "sweep", errors, 0, allow_none=True)
    if "resume_errored" in kw and not isinstance(kw["resume_errored"], bool):
        errors.append(f"sweep.resume_errored: expected true or false, got {kw['resume_errored']!r}")
    if kw.get("eval_path") is not None and not isinstance(kw["eval_path"], str):
        errors.append(f"sweep.eval_path: expected a path, got {kw['eval_path']!r}")
    gpt = kw.get("gpus_per_trial")
    if gpt is not None:
        gpt = _number(gpt, "sweep.gpus_per_trial", errors)
        if gpt is not None:
            per_worker = gpt / cfg.train.num_workers
            if gpt <= 0:
                errors.append(f"sweep.gpus_per_trial must be > 0, got {gpt}")
            elif per_worker > 1 and per_worker != int(per_worker):
                errors.append(
                    f"sweep.gpus_per_trial={gpt} gives each of train.num_workers={cfg.train.num_workers} workers "
                    f"{per_worker:g} GPUs; Ray shares a GPU only in fractions up to 1 (use a whole number above 1)"
                )
            kw["gpus_per_trial"] = gpt
    kw["scheduler"] = _parse_scheduler(kw.get("scheduler"), errors)
    if errors:
        raise ConfigError(errors, "sweep")
    spec = SweepSpec(**kw)
    if spec.scheduler is not None and spec.scheduler.max_t is None:
        unit = 1 if spec.scheduler.time_attr == "step" else spec.eval_every
        spec.scheduler.max_t = max(1, math.ceil(cfg.train.max_steps / unit))
        if spec.scheduler.grace_period > spec.scheduler.max_t:
            raise ConfigError(
                [
                    f"sweep.scheduler.asha.grace_period {spec.scheduler.grace_period} exceeds the {spec.scheduler.max_t} "
                    f"report(s) a trial makes (train.max_steps={cfg.train.max_steps}, sweep.eval_every={spec.eval_every});"
                    " lower grace_period or raise train.max_steps"
                ],
                "sweep",
            )
    if spec.metric == "eval_loss" and cfg.data.path and not spec.eval_path:
        raise ConfigError(
            ["sweep.metric eval_loss needs held-out data: set sweep.eval_path (or metric: loss)"], "sweep"
        )
    return spec


def _parse_scheduler(raw, errors: list[str]) -> AshaSpec | None:
    if raw in (None, "fifo", "none"):
        return None
    if raw == "asha":
        return AshaSpec()
    if not isinstance(raw, dict) or list(raw) != ["asha"]:
        errors.append(f"sweep.scheduler: expected {{asha: {{grace_period: ..., max_t: ...}}}} or fifo, got {raw!r}")
        return None
    kw = _build_dataclass(AshaSpec, raw["asha"] or {}, "sweep.scheduler.asha", errors)
    if kw is None:
        return None
    where = "sweep.scheduler.asha"
    n_before = len(errors)
    if "grace_period" in kw:
        _int(kw, "grace_period", where, errors, 1)
    if "max_t" in kw:
        _int(kw, "max_t", where, errors, 1, allow_none=True)
    if "reduction_factor" in kw:
        rf = _number(kw["reduction_factor"], f"{where}.reduction_factor", errors)
        if rf is not None and rf <= 1:
            errors.append(f"{where}.reduction_factor must be > 1, got {rf}")
        kw["reduction_factor"] = rf
    if kw.get("time_attr", "training_iteration") not in TIME_ATTRS:
        errors.append(f"{where}.time_attr: {kw['time_attr']!r}; choose one of {', '.join(TIME_ATTRS)}")
    if len(errors) > n_before:
        return None
    spec = AshaSpec(**kw)
    if spec.max_t is not None and spec.grace_period > spec.max_t:
        errors.append(f"{where}.grace_period {spec.grace_period} exceeds max_t {spec.max_t}")
    return spec


def param_space(spec: SweepSpec) -> dict:
    """The Ray Tune search space: a flat dict of dotted keys to Tune domains."""
    from ray import tune

    out = {}
    for key, dist in spec.space.items():
        ((kind, values),) = dist.items()
        if kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "uniform":
            out[key] = tune.uniform(*values)
        else:
            out[key] = tune.loguniform(*values)
    return out
