"""Record readers: JSONL, Parquet, local HF dataset folders (`save_to_disk`), and globs of them.

Every reader yields `Record`s one at a time with the file and the 1-based line (JSONL) or row
(Parquet, HF dataset) they came from, so a bad record can be reported as `file:line: reason`.
JSONL is parsed line by line with `json.loads`: pyarrow's JSON reader cannot skip or locate a
bad row (DESIGN.md), and we must do both. A JSONL record is a non-blank line; blank lines are
not records (an editor's trailing newline is not an error).

`start` / `stop` select records by index inside one file (what a resumed stream and a Ray Data
work unit need); Parquet skips whole row groups through the footer's row counts.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

# Rows per pyarrow batch when scanning Parquet / Arrow: big enough to amortise to_pylist,
# small enough that a batch of long chat records stays a few MB.
_BATCH_ROWS = 1024


class DataError(ValueError):
    """Bad training data: the message is one line naming the file, line and reason."""


class Record(NamedTuple):
    """One input record: where it came from, its value (a parsed JSON value), or why it could not be read."""

    source: str
    line: int
    value: Any
    error: str | None = None

    @property
    def where(self) -> str:
        """`file:line` for messages."""
        return f"{self.source}:{self.line}"


def file_kind(path: str) -> str:
    """Classify an input path as "jsonl", "parquet" or "hf" (a `save_to_disk` folder).

    Raises:
        DataError: the path is neither a known file type nor a HF dataset folder.
    """
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "state.json")):
            return "hf"
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            raise DataError(f"{path}: is a DatasetDict folder; pass one split's folder (e.g. {path}/train)")
        raise DataError(f"{path}: a folder that is not a HF dataset saved with save_to_disk")
    low = path.lower()
    if low.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataError(f"{path}: unknown data file type (expected .jsonl, .json, .parquet or a save_to_disk folder)")


def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from exc


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand globs into a deterministic list of existing inputs.

    Args:
        paths: one path or glob, or a list of them. Each glob expands in sorted order.

    Returns:
        The input paths, each checked with `file_kind`.

    Raises:
        FileNotFoundError: a path or glob matches nothing.
        ValueError: a path is of an unknown kind.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise FileNotFoundError("no data paths given")
    out: list[str] = []
    for p in items:
        p = os.fspath(p)
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
        if not matches:
            raise FileNotFoundError(f"{p}: no such data file or nothing matches the glob")
        for m in matches:
            file_kind(m)
            out.append(m)
    return out


def _iter_jsonl(path: str, start: int, stop: int | None) -> Iterator[Record]:
    # Bytes split on b"\n" alone, blank meaning ASCII whitespace only, exactly as `count_records` counts: a resumed
    # stream or a Ray Data work unit addresses records by that count. Text mode would also split on a lone "\r" and
    # take a line of non-breaking spaces for blank, and errors="replace" trained on U+FFFD for undecodable bytes.
    index = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if index >= start:
                if stop is not None and index >= stop:
                    return
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark
                try:
                    # without the line's end: a record cut short is then reported at its last column, not at
                    # column 1 of a second line
                    yield Record(path, lineno, json.loads(raw.decode("utf-8").rstrip("\r\n")))
                except UnicodeDecodeError as e:
                    yield Record(path, lineno, None, f"not valid UTF-8 (byte {e.start + 1} of the line)")
                except json.JSONDecodeError as e:
                    yield Record(path, lineno, None, f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
            index += 1


def _iter_batches_rows(batches, path: str, start: int, stop: int | None, first_row: int) -> Iterator[Record]:
    row = first_row
    for batch in batches:
        n = batch.num_rows
        if row + n <= start:
            row += n
            continue
        for i, value in enumerate(batch.to_pylist()):
            r = row + i
            if r < start:
                continue
            if stop is not None and r >= stop:
                return
            yield Record(path, r + 1, value)
        row += n
        if stop is not None and row >= stop:
            return


def _iter_parquet(path: str, start: int, stop: int | None) -> Iterator[Record]:
    pf = _parquet(path)
    md = pf.metadata
    groups, first_row, row = [], None, 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if row + n > start and (stop is None or row < stop):
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    if not groups:
        return
    yield from _iter_batches_rows(
        pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups), path, start, stop, first_row
    )


def _load_hf(path: str):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: is a DatasetDict; pass one split's folder")
    # save_to_disk flattens any indices mapping, so the arrow table is the dataset's row order.
    return ds


def _iter_hf(path: str, start: int, stop: int | None) -> Iterator[Record]:
    table = _load_hf(path).data.table
    yield from _iter_batches_rows(table.to_batches(max_chunksize=_BATCH_ROWS), path, start, stop, 0)


def count_records(path: str) -> int:
    """Number of records in one input (non-blank lines for JSONL; rows otherwise)."""
    kind = file_kind(path)
    if kind == "parquet":
        return _parquet(path).metadata.num_rows
    if kind == "hf":
        return len(_load_hf(path))
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def iter_file(path: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
    """Yield the records of one input, from record index `start` up to `stop` (exclusive).

    Args:
        path: a JSONL / Parquet file or a HF dataset folder.
        start: index of the first record to yield (0-based, blank JSONL lines not counted).
        stop: index to stop before, or None for the end.

    Yields:
        `Record`s; a line that is not valid JSON yields a Record with `error` set and value None.
    """
    kind = file_kind(path)
    if kind == "jsonl":
        return _iter_jsonl(path, start, stop)
    if kind == "parquet":
        return _iter_parquet(path, start, stop)
    return _iter_hf(path, start, stop)


def iter_records(paths: Sequence[str], skip: int = 0) -> Iterator[Record]:
    """Yield the records of several inputs in order, after skipping the first `skip` of them.

    Args:
        paths: inputs as returned by `expand_paths`.
        skip: records to skip across all files (a resumed stream's position).

    Yields:
        `Record`s.
    """
    for path in paths:
        if skip:
            n = count_records(path)
            if skip >= n:
                skip -= n
                continue
        yield from iter_file(path, start=skip)
        skip = 0
