"""Where an export may be written, and how it is written so that a crash never leaves half an export behind.

Every export lands in a folder inside the run folder (``runs/<name>/exports/<format>/`` by default). The output path
is checked before anything is computed: no ``..`` component, nothing outside the run folder, no symlink anywhere
between the run folder and the target (a symlink could point a write outside the run after the check). The export is
built under a hidden temporary sibling (``.<name>.tmp-<pid>-<random>``) and renamed into place only once complete, so a
reader sees either the previous export or the finished new one. An existing export is replaced only with
``force=True``; the old folder is moved aside first and deleted after the new one is in place.

All user-facing failures of the export layer raise :class:`ExportError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
RUN_META = "raytune_llm.json"
RUN_CONFIG = "config.yaml"


class ExportError(Exception):
    """An export that cannot be done as asked; the message is one line and names the fix."""


@dataclass(frozen=True)
class Source:
    """A resolved export source.

    Attributes:
        root: the folder exports go under (the run folder, or the adapter folder itself when it is not in a run).
        adapter_dir: the PEFT adapter folder (adapter_config.json inside).
        base_dir: the local base model folder named by the adapter's base_model_name_or_path.
        quant: the trainer's quantization record (raytune_llm.json), ``{"quant_bits": 16}`` when absent.
    """

    root: Path
    adapter_dir: Path
    base_dir: Path
    quant: dict


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} must hold a JSON object")
    return data


def write_run_meta(folder: Path, cfg, on_gpu: bool) -> None:
    """Write the quantization record (RUN_META) of a run config into an adapter folder.

    What an exact merge must reproduce: the bits, NF4's block size and double quantization, and the dtype the base
    was loaded (and quantized) in. Written next to every adapter the trainer saves (each checkpoint's, the run's
    final one and a sweep's best), so that any of them exports the weights it was trained against.

    Args:
        folder: the adapter folder (``adapter_config.json`` inside).
        cfg: the run's `config.RunConfig`.
        on_gpu: whether the workers trained on GPUs (``model.dtype: auto`` means bf16 there, fp32 on CPUs).
    """
    auto = "bfloat16" if on_gpu else "float32"
    meta = {
        "quant_bits": cfg.quant.bits,
        "quant_type": "nf4",
        "double_quant": cfg.quant.double_quant,
        "blocksize": 64,
        "compute_dtype": {"auto": auto, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[cfg.model.dtype],
    }
    (Path(folder) / RUN_META).write_text(json.dumps(meta, indent=1) + "\n")


def resolve_source(source: str | os.PathLike) -> Source:
    """Find the adapter, its base model and the quantization record for a run or adapter folder.

    Args:
        source: a run folder (its ``adapter/`` is used) or an adapter folder (``adapter_config.json`` inside).

    Returns:
        The resolved :class:`Source`.

    Raises:
        ExportError: the folder is neither, the base model folder is missing, or raytune_llm.json is malformed.
    """
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder; give a run folder or an adapter folder")
    path = path.resolve()
    if (path / ADAPTER_CONFIG).is_file():
        adapter_dir = path
    elif (path / "adapter" / ADAPTER_CONFIG).is_file():
        adapter_dir = path / "adapter"
    elif (path / "config.json").is_file():
        raise ExportError(f"{path} is a full model folder, not a run or adapter; it has nothing to merge or export")
    else:
        hint = ""
        if (path / "ray" / "train").is_dir():
            hint = f" (a run that did not finish: export one of its checkpoints, {path}/ray/train/.../checkpoint_*)"
        raise ExportError(
            f"{path} has no adapter_config.json and no adapter/ folder; give a run or adapter folder{hint}"
        )
    # The run folder this adapter belongs to (a checkpoint's or an earlier export's lies a few levels below it): the
    # outputs go there, never inside a checkpoint or an export; else the folder given.
    root = (
        path
        if (path / RUN_CONFIG).is_file()
        else next((p for p in list(adapter_dir.parents)[:5] if (p / RUN_CONFIG).is_file()), path)
    )
    cfg = _read_json(adapter_dir / ADAPTER_CONFIG)
    base = cfg.get("base_model_name_or_path")
    if not base:
        if _random_weights(root / RUN_CONFIG):
            raise ExportError(
                f"{root} trained on random base weights (model.random_weights), which were never saved: there is "
                "nothing to merge or export"
            )
        raise ExportError(f"{adapter_dir / ADAPTER_CONFIG} has no base_model_name_or_path")
    if not isinstance(base, str):
        raise ExportError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path must be a folder path, got {base!r}"
        )
    base_dir = Path(base).expanduser()
    if not base_dir.is_absolute():
        base_dir = (adapter_dir / base_dir).resolve()
    if not (base_dir / "config.json").is_file() and (root / "base_model" / "config.json").is_file():
        base_dir = root / "base_model"  # a run folder copied or moved (ray rsync-down): its own base model
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"base model folder {base_dir} (from adapter_config.json) has no config.json")
    quant = {"quant_bits": 16}
    if (adapter_dir / RUN_META).is_file():
        quant = _read_json(adapter_dir / RUN_META)
        bits = quant.get("quant_bits")
        if bits not in (4, 16):
            raise ExportError(f"{adapter_dir / RUN_META}: quant_bits must be 4 or 16, got {bits!r}")
        if bits == 4 and quant.get("quant_type", "nf4") != "nf4":
            raise ExportError(
                f"{adapter_dir / RUN_META}: only quant_type 'nf4' is supported, got {quant['quant_type']!r}"
            )
    return Source(root=root, adapter_dir=adapter_dir, base_dir=base_dir, quant=quant)


def resolve_output(root: Path, out: str | os.PathLike | None, default_name: str) -> Path:
    """Check and resolve the output folder of an export.

    Args:
        root: the run folder; the output must lie inside it.
        out: the requested output (relative paths are taken from ``root``); None means ``root/exports/<default_name>``.
        default_name: the folder name under ``exports/`` used when ``out`` is None.

    Returns:
        The absolute output path (it may not exist yet).

    Raises:
        ExportError: the path has a ``..`` component, lies outside ``root``, or passes through a symlink.
    """
    root = Path(root).resolve()
    if out is None:
        target = root / "exports" / default_name
    else:
        given = Path(out).expanduser()
        if ".." in given.parts:
            raise ExportError(f"output path {out} contains '..'; give a path inside {root}")
        target = given if given.is_absolute() else root / given
    # Compare lexically (not with resolve()) so a symlink inside the run cannot be used to leave it.
    target = Path(os.path.normpath(target))
    try:
        rel = target.relative_to(root)
    except ValueError:
        raise ExportError(f"output path {target} is outside the run folder {root}") from None
    if rel == Path("."):
        raise ExportError(f"output path {target} is the run folder itself; give a sub-folder")
    cur = root
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            raise ExportError(f"output path {target} goes through the symlink {cur}; symlinks are not followed")
    return target


def _claim(target: Path, force: bool, folder: bool) -> str:
    """Check that ``target`` may be written (absent, or ``force`` and of the right kind), make its parent folder, and
    return a unique tag for the temporary names beside it."""
    if target.exists() and not force:
        raise ExportError(f"{target} already exists; pass force=True (--force) to replace it")
    if folder and target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a folder; remove it first")
    if not folder and target.is_dir():
        raise ExportError(f"{target} is a folder; remove it first")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ExportError(f"cannot make the folder {target.parent}: a file is in the way") from None
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``target`` when the block finishes without an error.

    Args:
        target: the final output folder.
        force: replace an existing ``target``; without it an existing one is an error.

    Yields:
        The temporary folder to write into (a sibling of ``target``, so the final rename stays on one filesystem).

    Raises:
        ExportError: ``target`` exists and ``force`` is False, or it exists and is not a folder.
    """
    tag = _claim(target, force, folder=True)
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{tag}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` that replaces it when the block finishes without an error.

    For single-file exports (GGUF): the other files of ``target``'s folder (other GGUF types) stay.

    Raises:
        ExportError: ``target`` exists and ``force`` is False, or it is in the way as a folder.
    """
    tmp = target.parent / f".{target.name}.tmp-{_claim(target, force, folder=False)}"
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _random_weights(run_config: Path) -> bool:
    """Whether a run folder's saved config.yaml set model.random_weights (False where there is none to read)."""
    import yaml

    try:
        model = (yaml.safe_load(run_config.read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return model.get("random_weights") is True
