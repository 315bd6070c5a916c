"""Reading a run configuration: YAML + `key=value` overrides through omegaconf, walked against the schema.

`load_config` lets omegaconf read the YAML and merge the dotlist, then walks the result against the dataclasses of
`config.sections` itself, collecting every problem (see the package docstring); `to_dict` / `from_dict` move a
RunConfig to and from plain data (the workers get it that way).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from raytune_llm.config.sections import ConfigError, RunConfig, _collecting, _FieldError

# ------------------------------------------------------------------------------- schema walking


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, errors: list[str]):
    """Check `value` against the annotation `tp`; return the converted value (or None after an error)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a section (mapping), got {value!r}")
            return None
        return _build(tp, value, key, errors)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off/yes/no as a boolean: take the word back
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in allowed), value)
        for a in allowed:  # YAML reads `16` as int; accept "16" for a Literal[4, 16] too
            if value == a or (isinstance(a, int) and isinstance(value, str) and value.isdigit() and int(value) == a):
                return a
        errors.append(f"{key}: {value!r} is not allowed; choose one of {', '.join(repr(a) for a in allowed)}")
        return None
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            trial: list[str] = []  # fresh per member: one member's error must not fail the next
            out = _coerce(value, a, key, trial)
            if not trial:
                return out
        errors.append(f"{key}: {value!r} is not a {_type_name(tp)}")
        return None
    if origin is list:
        if not isinstance(value, list | tuple):
            errors.append(f"{key}: expected a list, got {value!r}")
            return None
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{key}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                errors.append(f"{key}: expected a finite number, got {value!r}")
                return None
            return float(value)
        errors.append(f"{key}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{key}: expected a string, got {value!r}")
        return None
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


# Names other fine-tuning tools (PEFT, transformers' Trainer, TRL) give these settings, for the "did you mean" of an
# unknown key whose spelling is not close to ours.
_KNOWN_AS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "max_seq_length": "seq_len",
    "max_length": "seq_len",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_grad_norm": "grad_clip",
    "save_steps": "checkpoint_every",
    "logging_steps": "log_every",
    "packing": "pack",
    "load_in_4bit": "bits",
}


def _build(cls, data: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            close = [_KNOWN_AS[key]] if _KNOWN_AS.get(key) in names else close
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            errors.append(f"unknown key {full!r}{hint} (allowed: {', '.join(names)})")
            continue
        n_before = len(errors)
        converted = _coerce(value, hints[key], full, errors)
        if len(errors) == n_before:
            kwargs[key] = converted
    n_before = len(errors)
    failed: list[str] = []
    _collecting.append(failed)
    try:
        obj = cls(**kwargs)
        if not failed:
            return obj
    except _FieldError as exc:
        failed.append(str(exc))
    except TypeError as exc:  # a field whose sub-section failed: the cause is already recorded
        if len(errors) == n_before:
            errors.append(f"{prefix or 'config'}: {exc}")
    finally:
        _collecting.pop()
    errors.extend(f"{prefix}.{msg}" if prefix else msg for msg in failed)
    # Sections that failed their own checks: fall back to the defaults so sibling checks still run.
    try:
        return cls()
    except _FieldError:
        return None


def _yaml_problem(exc: Exception) -> str:
    """A YAML error as one line: the problem and where (PyYAML's first line only says what it was parsing)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc).splitlines()[0]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run configuration: YAML file + `key=value` overrides, validated against the schema.

    Args:
        path: YAML file; None gives the embedded default (the quickstart).
        overrides: dotlist such as ["train.max_steps=50", "model.path=/models/x"].

    Returns:
        The validated RunConfig.

    Raises:
        ConfigError: every problem found, each naming its full dotted key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    source = str(path) if path is not None else "defaults"
    try:
        base = OmegaConf.create({})
        if path is not None:
            p = Path(path)
            if p.is_dir():
                raise ConfigError([f"{str(p)!r} is a folder, not a config file (conf/*.yaml)"], source)
            if not p.is_file():
                raise ConfigError([f"config file {str(p)!r} does not exist"], source)
            base = OmegaConf.load(p)
            if not isinstance(base, type(OmegaConf.create({}))):
                raise ConfigError(["the top level must be a mapping of sections"], source)
        bad = [o for o in overrides or [] if "=" not in o or not o.split("=", 1)[0].strip()]
        if bad:
            raise ConfigError([f"override {o!r} is not key=value" for o in bad], source)
        try:
            merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides or [])))
        except Exception:
            # Name the override that does not fit the file (e.g. lora=[1] over the lora section) or is not YAML.
            for o in overrides or []:
                try:
                    OmegaConf.merge(base, OmegaConf.from_dotlist([o]))
                except OmegaConfBaseException as one:
                    raise ConfigError([f"override {o!r}: {str(one).splitlines()[0]}"], source) from None
                except Exception as one:  # not YAML: the problem alone (its line and column are the dotlist's)
                    raise ConfigError(
                        [f"override {o!r}: {getattr(one, 'problem', None) or _yaml_problem(one)}"], source
                    ) from None
            raise
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError([str(exc).splitlines()[0]], source) from None
    except Exception as exc:  # YAML syntax errors and the like
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError([f"cannot read: {_yaml_problem(exc)}"], source) from None
    errors: list[str] = []
    cfg = _build(RunConfig, data or {}, "", errors)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    """The resolved configuration as plain data (what is written into the run folder)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from `to_dict` output (e.g. a run folder's config.yaml), validating it."""
    errors: list[str] = []
    cfg = _build(RunConfig, data, "", errors)
    if errors:
        raise ConfigError(errors, "saved config")
    return cfg
