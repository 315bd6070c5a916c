"""Checks a run passes before anything heavy starts: the user's paths and output folder, the LoRA targets, the data's
tokenizer source and the cluster address before Ray starts (`preflight`, also what `raytune-llm validate` runs), and
enough packed rows for every worker (`check_rows`, once the data is packed). Each failure is one `UserError` line."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from raytune_llm.config import RunConfig
from raytune_llm.train.errors import UserError


def has_tokenizer(folder: Path) -> bool:
    """A tokenizer folder: tokenizer.json or tokenizer.model inside."""
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()


def resolve_data_paths(path: str, key: str = "data.path") -> list[str]:
    """Expand a data path or glob (``~`` included) into existing, non-empty inputs, or raise UserError naming `key`."""
    full = os.path.expanduser(path)
    matches = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
    existing = [m for m in matches if os.path.exists(m)]
    if not existing:
        raise UserError(f"{key} {path!r}: no such file or folder")
    for m in existing:
        if os.path.isfile(m) and os.path.getsize(m) == 0:
            raise UserError(f"{key} {m!r} is empty")
    return existing


# Module names of the embedded default's tiny Llama (models.tiny.build_tiny_model, family "llama"): its LoRA targets
# are checked before anything is built. tests/test_cli.py holds this to the built model's own names.
TINY_MODULE_NAMES = frozenset(
    {
        "model", "embed_tokens", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "gate_proj",
        "up_proj", "down_proj", "act_fn", "input_layernorm", "post_attention_layernorm", "norm", "rotary_emb", "lm_head",
    }
)  # fmt: skip


def _check_writable(path: Path, key: str) -> None:
    """Fail when the nearest existing folder of `path` cannot be written (the run folder is made under it)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key} {str(path)!r}: cannot write there ({probe} is not a writable folder)")


def preflight(cfg: RunConfig) -> dict[str, int]:
    """Checks of the user's paths and data, run before Ray starts and before anything is written.

    Returns:
        `packing.validate.validate_data`'s stats of data.path's records ({} for the embedded task): every record's
        JSON and schema is read once here, so bad data fails in one line before a tokenizer or model is built (a
        trainer's packing pipeline takes the format found here and does not scan them again).

    Raises:
        UserError: an output_dir that cannot be written, a missing model or tokenizer folder, LoRA targets the model
            lacks, a missing or empty data file, data a tokenizer cannot be trained from, a GGUF export of a model
            type it does not support.
        DataError: a bad record (data.on_bad_record=fail), too many (skip), or no valid record.
    """
    in_job_package = "/runtime_resources/working_dir_files/" in str(Path.cwd())  # `ray job submit --working-dir`
    if in_job_package and not Path(cfg.output_dir).expanduser().is_absolute():
        raise UserError(
            f"output_dir {cfg.output_dir!r} is relative: under `ray job submit` it lies in the job's temporary working "
            "directory, which Ray deletes; set output_dir to an absolute shared path (e.g. output_dir=/shared/runs)"
        )
    _check_writable(cfg.run_dir.expanduser(), "output_dir")
    model = Path(os.path.expanduser(cfg.model.path)) if cfg.model.path else None
    if model is not None and not (model / "config.json").is_file():
        raise UserError(f"model.path {cfg.model.path!r} is not a Hugging Face model folder (no config.json)")
    check_lora_targets(cfg, model, None if model is not None else set(TINY_MODULE_NAMES))
    if cfg.model.tokenizer_path and not has_tokenizer(Path(os.path.expanduser(cfg.model.tokenizer_path))):
        raise UserError(f"model.tokenizer_path {cfg.model.tokenizer_path!r} holds no tokenizer")
    if "gguf" in cfg.export.formats:  # found out before training, not after it
        from raytune_llm.export.gguf import GGUF_MODEL_TYPES, check_tokenizer
        from raytune_llm.export.safety import ExportError

        model_type = "llama"  # the embedded default
        if cfg.model.path:
            model_type = json.loads((Path(os.path.expanduser(cfg.model.path)) / "config.json").read_text()).get(
                "model_type"
            )
        if model_type not in GGUF_MODEL_TYPES:
            raise UserError(
                f"export.formats has gguf, which supports model types {', '.join(GGUF_MODEL_TYPES)}, not {model_type!r}"
            )
        # The export reads the base model's tokenizer (adapters carry none); the embedded default's base gets the
        # byte-level BPE tokenizer the run trains.
        if model is not None:
            try:
                check_tokenizer(model)
            except ExportError as exc:
                raise UserError(f"export.formats has gguf, but {model}: {exc}") from None
    if not cfg.data.path:
        return {}
    from raytune_llm.packing.readers import expand_paths
    from raytune_llm.packing.validate import validate_data

    paths = expand_paths(resolve_data_paths(cfg.data.path))  # an unknown file type fails here, before the scan
    trains_tokenizer = not cfg.model.tokenizer_path and not (model is not None and has_tokenizer(model))
    other = [p for p in paths if not p.endswith((".jsonl", ".json"))]
    if trains_tokenizer and other:
        raise UserError(
            f"{other[0]}: a tokenizer is trained only from JSONL data; set model.tokenizer_path (or a model.path "
            "with a tokenizer)"
        )
    return validate_data(
        paths,
        cfg.data.format,
        skip_bad_records=cfg.data.on_bad_record == "skip",
        max_bad_fraction=cfg.data.max_bad_fraction,
    )


def model_hf_config(cfg: RunConfig, shape: str | None = None) -> dict:
    """The model's config as a dict of HF keys: a known shape's (``--shape``), the embedded model's, or
    model.path's config.json."""
    from raytune_llm.sharding import planner

    known = {"llama-3.1-8b": planner.LLAMA31_8B, "llama-3.1-70b": planner.LLAMA31_70B}
    if shape:
        if shape not in known:
            raise FileNotFoundError(f"--shape {shape!r}: known shapes are {', '.join(known)}")
        return dict(known[shape])
    if not cfg.model.path:
        return {
            "hidden_size": cfg.model.tiny.hidden_size,
            "intermediate_size": cfg.model.tiny.intermediate_size,
            "num_hidden_layers": cfg.model.tiny.num_layers,
            "num_attention_heads": cfg.model.tiny.num_heads,
            "num_key_value_heads": cfg.model.tiny.num_kv_heads,
            "vocab_size": cfg.model.tiny.vocab_size,
        }
    p = Path(os.path.expanduser(cfg.model.path))
    p = p if p.suffix == ".json" else p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"model.path: no config.json at {p} (or plan a known shape: --shape {' / '.join(known)})"
        )
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise planner.PlanError(f"{p}: not valid JSON ({str(exc).splitlines()[0]})") from None


def capped_notes(hf: dict, plan) -> list[str]:
    """`sharding.host_memory.capped_settings`'s lines for this model: layer counts it takes fewer of than asked."""
    from raytune_llm.sharding.host_memory import capped_settings
    from raytune_llm.sharding.shapes import Shape

    return [f"note: {line}" for line in capped_settings(Shape.from_hf(hf), plan.inputs)]


def layer_count_notes(cfg: RunConfig) -> list[str]:
    """The layer counts this model takes fewer of than the config asks, as `raytune-llm plan` says them (a count past
    what the model takes is not an error: each setting takes what it can), for `validate` and `train` to print; none
    when the planner cannot read the model's config (the model load decides then) or with ``checkpoint_layers:
    auto`` (each worker resolves it against its own GPU's memory)."""
    from raytune_llm.train.sharded import plan_for

    if cfg.model.checkpoint_layers == "auto":  # the workers resolve it against their GPU: the plan here may differ
        return []
    try:
        hf = model_hf_config(cfg)
        return capped_notes(hf, plan_for(cfg, hf, gpus_per_node=max(1, cfg.train.num_workers), nodes=1))
    except Exception:  # notes only: a config the planner cannot read is the model load's to judge
        return []


def check_lora_targets(cfg: RunConfig, model_path: Path | None, names: set[str] | None = None) -> None:
    """Fail in a second, before any worker starts, when `lora.target_modules` names no module of the model.

    Args:
        cfg: the run config.
        model_path: the local HF model folder (None with `names`).
        names: the model's module leaf names when already known (`models.lora.module_leaf_names`, which imports
            transformers and builds the model on the meta device: ~4 s in a fresh process on the 2-core machine).

    Raises:
        UserError: naming the targets and the model's projections.
    """
    from raytune_llm.models.lora_spec import LoraSpec, check_targets

    spec = LoraSpec(target_modules=tuple(cfg.lora.target_modules))
    if names is None:
        from raytune_llm.models.lora import module_leaf_names

        try:
            names = module_leaf_names(model_path, cfg.model.trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:  # transformers' own words: an unknown model_type, bad JSON
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"model.path {str(model_path)!r}: transformers cannot build it: {first}") from exc
    try:
        check_targets(spec, names)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a cluster address where nothing listens (ray.init retries it for minutes).

    Raises:
        UserError: a host:port (or ray://host:port) that refuses or does not answer a TCP connection.
    """
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return  # "auto" and forms without a port: Ray resolves them itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"cluster.address {address!r}: nothing answers there ({exc.strerror or exc}); start the head with "
            "`ray start --head` or fix the address"
        ) from None


def check_rows(cfg: RunConfig, rows: int) -> None:
    """Fail before any worker starts when the data cannot give every worker one micro-batch.

    Raises:
        UserError: fewer packed rows than `train.num_workers` x `train.micro_batch_size`.
    """
    need = cfg.train.num_workers * cfg.train.micro_batch_size
    if rows < need:
        raise UserError(
            f"the data makes {rows} row(s) of data.seq_len={cfg.data.seq_len} tokens but train.num_workers="
            f"{cfg.train.num_workers} x train.micro_batch_size={cfg.train.micro_batch_size} needs at least {need}; "
            "add data or lower those settings"
        )
