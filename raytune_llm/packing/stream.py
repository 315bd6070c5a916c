"""From data files to packed rows: the in-process stream, its Ray Data form, and torch batches.

`open_stream` reads records, validates them (bad-record policy of validate.py), renders and
tokenizes them in batches, applies the over-long policy, drops examples that are empty or have
no trainable token, and packs them (packer.py). Memory is bounded by one packing window plus
one tokenization chunk whatever the input size. Its `state_dict()` adds the stats as of the
current window's start to the packer's position, so a resumed run's counts are also exact.

`build_ray_dataset` runs the same code inside Ray Data: the driver splits the inputs into work
units of `records_per_task` records (file, start, stop), `ray.data.from_items(units)` feeds
them to `map_batches`, and each task streams its unit into pyarrow tables of packed rows (Ray
Data shows its progress bar). Tasks add their counts to a small stats actor, and the bad-record
share is judged on its running totals once they cover 1000 records. Ray Train workers
read their own shard (`ray.train.get_dataset_shard("train")`) and `iter_torch_batches` turns
its pyarrow batches into torch tensors.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .formats import FORMATS, check_record, detect_format, encode_chunk, render
from .packer import IGNORE_INDEX, PackedStream, SourceItem, fit_length, has_trainable_token, pack_window, rows_to_arrow
from .readers import count_records, expand_paths, iter_file, iter_records
from .validate import MIN_RECORDS_FOR_SHARE, DataError, DataStats, detected_format, validate_data

OVERLONG = ("truncate", "drop", "split")
# Records rendered and tokenized per encode_batch call: enough to keep the Rust tokenizer's
# threads busy, small enough to keep memory flat (a few MB of text).
_TOKENIZE_CHUNK = 512


def _check_options(format: str, overlong: str, seq_len: int) -> None:
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format={format!r}: expected 'auto' or one of {', '.join(FORMATS)}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: expected one of {', '.join(OVERLONG)}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be at least 2")


def detect_data_format(files: Sequence[str]) -> str:
    """The format of the first valid record of `files` (format="auto").

    Raises:
        DataError: no record of the inputs matches a known format.
    """
    for rec in iter_records(files):
        if rec.error is None:
            fmt = detect_format(rec.value)
            if fmt is not None:
                return fmt
    raise DataError(f"{files[0]}: no record matches a known format ({', '.join(FORMATS)})")


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, str | os.PathLike):
        return _cached_tokenizer(os.fspath(tokenizer))
    return tokenizer


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize_records(
    records,
    fmt: str,
    tokenizer,
    seq_len: int,
    stats: DataStats,
    *,
    train_on_prompt: bool,
    overlong: str,
    check_share_at_end: bool = True,
) -> Iterator[SourceItem]:
    """Turn records into packable examples, one item per record (None when bad or dropped).

    Args:
        records: an iterator of readers.Record.
        fmt: the data format.
        tokenizer: a transformers fast tokenizer.
        seq_len: row length (for the over-long policy).
        stats: counters and bad-record policy (raises DataError per its policy).
        train_on_prompt: train on prompt tokens too.
        overlong: "truncate", "drop" or "split".
        check_share_at_end: check the bad-record share once more after the last record (off for a
            Ray task, whose share is judged on the totals of all tasks).

    Yields:
        An Example, a list of pieces (split), or None, for every input record in order.
    """
    chunk: list[Any] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= _TOKENIZE_CHUNK:
            yield from _apply_events(_tokenize_chunk(chunk, fmt, tokenizer, seq_len, train_on_prompt, overlong), stats)
            chunk = []
    yield from _apply_events(_tokenize_chunk(chunk, fmt, tokenizer, seq_len, train_on_prompt, overlong), stats)
    if check_share_at_end:
        stats.check_share()


def _apply_events(done: list[tuple], stats: DataStats) -> Iterator[SourceItem]:
    # Counts land when their record is handed on, not when its chunk is tokenized, so the stats
    # always describe exactly the records consumed: a checkpoint's counts are exact.
    c = stats.counts
    for item, bad, extra, n_ex, n_tok, n_train in done:
        c["records"] += 1
        if bad is not None:
            stats.bad(*bad)
        elif extra is not None:
            c[extra] += 1
        if n_ex:
            c["examples"] += n_ex
            c["tokens"] += n_tok
            c["trainable_tokens"] += n_train
        yield item


_OVERLONG_KEY = {"truncate": "overlong_truncated", "drop": "overlong_dropped", "split": "overlong_split"}


def _tokenize_chunk(chunk, fmt, tokenizer, seq_len, train_on_prompt, overlong) -> list[tuple]:
    """Per record: (item, bad event or None, counter key or None, examples, tokens, trainable tokens)."""
    done: list[tuple] = [(None, None, None, 0, 0, 0)] * len(chunk)
    good, rendered = [], []
    for i, rec in enumerate(chunk):
        if rec.error is not None:
            done[i] = (None, (rec.where, "invalid_json", rec.error), None, 0, 0, 0)
            continue
        problem = check_record(fmt, rec.value)
        if problem is not None:
            done[i] = (None, (rec.where, *problem), None, 0, 0, 0)
            continue
        good.append(i)
        rendered.append(render(fmt, rec.value, tokenizer, train_on_prompt))
    enc = encode_chunk(tokenizer, rendered)
    for i, ex, n_train in zip(good, enc.examples, enc.trainable.tolist()):
        n = len(ex.input_ids)
        if n == 0:
            done[i] = (None, None, "dropped_empty", 0, 0, 0)
        elif n <= seq_len:
            if n_train:
                done[i] = (ex, None, None, 1, n, n_train)
            else:
                done[i] = (None, None, "dropped_no_trainable", 0, 0, 0)
        else:
            # Over-long (rare): counted under its policy; the pieces that still train are kept.
            pieces = [p for p in fit_length(ex, seq_len, overlong) if has_trainable_token(p.labels)]
            n_tok = sum(len(p.input_ids) for p in pieces)
            n_tr = sum(int((p.labels[1:] != IGNORE_INDEX).sum()) for p in pieces)
            item = (pieces[0] if len(pieces) == 1 else pieces) if pieces else None
            done[i] = (item, None, _OVERLONG_KEY[overlong], len(pieces), n_tok, n_tr)
    return done


class FileStream(PackedStream):
    """A PackedStream over data files, with a `stats` dict that is part of its checkpointable state."""

    def __init__(
        self,
        files: list[str],
        tokenizer,
        seq_len: int,
        *,
        format: str,
        train_on_prompt: bool,
        overlong: str,
        skip_bad_records: bool,
        max_bad_fraction: float,
        window_rows: int,
        seed: int,
        pack: bool = True,
    ):
        """Create the stream; see `open_stream` for the arguments."""
        self.files = files
        self.tokenizer = tokenizer
        self.format = format
        self.train_on_prompt = train_on_prompt
        self.overlong = overlong
        self._stats = DataStats(skip_bad_records, max_bad_fraction)
        self._window_start_stats: dict[str, int] = {}
        self._loaded_stats: dict[str, int] = {}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad rows with")
        super().__init__(self._source, seq_len, pad_id, window_rows=window_rows, seed=seed, pack=pack)

    def _source(self, skip: int) -> Iterator[SourceItem]:
        if self.format == "auto":
            self.format = detect_data_format(self.files)
        records = iter_records(self.files, skip=skip)
        return tokenize_records(
            records,
            self.format,
            self.tokenizer,
            self.seq_len,
            self._stats,
            train_on_prompt=self.train_on_prompt,
            overlong=self.overlong,
        )

    @property
    def stats(self) -> dict[str, int]:
        """Counts so far (records read ahead into the current window included): the trainer's data metrics."""
        return self._stats.as_dict()

    @property
    def first_bad(self) -> list[str]:
        """The first few skipped bad records as "file:line: reason" (also logged as warnings)."""
        return list(self._stats.first_bad)

    def _window_loaded(self) -> None:
        self._loaded_stats = self._stats.as_dict()

    def _window_finished(self) -> None:
        self._window_start_stats = self._loaded_stats

    def state_dict(self) -> dict:
        """Position plus the stats as of the current window's start (JSON-able)."""
        return {**super().state_dict(), "stats": dict(self._window_start_stats), "format": self.format}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; counts continue from the checkpoint's."""
        super().load_state_dict(state)
        self._window_start_stats = dict(state.get("stats", {}))
        self._stats.load_dict(self._window_start_stats)
        if state.get("format", "auto") != "auto":
            self.format = state["format"]


def open_stream(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    seq_len: int,
    *,
    format: str = "auto",
    train_on_prompt: bool = False,
    overlong: str = "truncate",
    skip_bad_records: bool = False,
    max_bad_fraction: float = 0.01,
    window_rows: int = 256,
    seed: int = 0,
    pack: bool = True,
) -> FileStream:
    """Packed rows from data files, in process, with bounded memory and an exact resume position.

    Args:
        paths: JSONL / Parquet files, HF `save_to_disk` folders, or globs of them.
        tokenizer: a transformers fast tokenizer or the folder to load one from.
        seq_len: row length in tokens.
        format: "auto" (from the first valid record), "text", "prompt_completion", "alpaca" or "chat".
        train_on_prompt: train on prompt / non-assistant tokens too.
        overlong: examples longer than seq_len are "truncate"d, "drop"ped or "split".
        skip_bad_records: count and skip bad records instead of failing on the first one.
        max_bad_fraction: abort once bad records exceed this share of records.
        window_rows: packing window in rows' worth of tokens.
        seed: row-order shuffle seed.
        pack: False puts each example in a row of its own, padded to seq_len (`data.pack: false`).

    Returns:
        A `FileStream`: iterate it for row dicts; `stats`, `state_dict()`, `load_state_dict()`.

    Raises:
        ValueError: a bad option. FileNotFoundError: a path matches nothing. DataError (while
        iterating): bad data under the policy above.
    """
    _check_options(format, overlong, seq_len)
    return FileStream(
        expand_paths(paths),
        _load_tokenizer(tokenizer),
        seq_len,
        format=format,
        train_on_prompt=train_on_prompt,
        overlong=overlong,
        skip_bad_records=skip_bad_records,
        max_bad_fraction=max_bad_fraction,
        window_rows=window_rows,
        seed=seed,
        pack=pack,
    )


def _make_stats_actor():
    import ray

    @ray.remote(num_cpus=0)
    class DataStatsActor:
        """Sums the stats dicts of the packing tasks."""

        def __init__(self):
            self.totals: dict[str, int] = {}

        def add(self, d: dict[str, int]) -> dict[str, int]:
            for k, v in d.items():
                self.totals[k] = self.totals.get(k, 0) + v
            return dict(self.totals)

        def get(self) -> dict[str, int]:
            return dict(self.totals)

    return DataStatsActor.remote()


def _pack_units(batch: dict[str, np.ndarray], **kw) -> Iterator[pa.Table]:
    """map_batches body: stream each unit (file, start, stop) into packed pyarrow tables."""
    import ray

    tokenizer = _load_tokenizer(kw["tokenizer"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for path, start, stop, unit in zip(batch["path"], batch["start"], batch["stop"], batch["unit"]):
        stats = DataStats(kw["skip_bad_records"], kw["max_bad_fraction"])
        items = tokenize_records(
            iter_file(str(path), int(start), int(stop)),
            kw["format"],
            tokenizer,
            kw["seq_len"],
            stats,
            train_on_prompt=kw["train_on_prompt"],
            overlong=kw["overlong"],
            check_share_at_end=False,
        )
        budget, buf, tokens, window = kw["window_rows"] * kw["seq_len"], [], 0, 0
        seed = kw["seed"] * 1_000_003 + int(unit)  # every unit shuffles its rows differently
        for item in items:
            for ex in () if item is None else ([item] if not isinstance(item, list) else item):
                buf.append(ex)
                tokens += len(ex.input_ids) if kw["pack"] else kw["seq_len"]  # unpacked: a whole row each
            if tokens >= budget:
                yield rows_to_arrow(pack_window(buf, kw["seq_len"], pad_id, seed, window, kw["pack"]))
                buf, tokens, window = [], 0, window + 1
        if buf:
            yield rows_to_arrow(pack_window(buf, kw["seq_len"], pad_id, seed, window, kw["pack"]))
        # The bad-record share is judged on all tasks' totals (one unit may be small or unlucky),
        # once they cover enough records to mean something.
        totals = DataStats(kw["skip_bad_records"], kw["max_bad_fraction"])
        totals.load_dict(ray.get(kw["stats_actor"].add.remote(stats.as_dict())))
        if totals.counts["records"] >= MIN_RECORDS_FOR_SHARE:
            totals.first_bad = stats.first_bad
            totals.check_share()


def build_ray_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    seq_len: int,
    *,
    format: str = "auto",
    train_on_prompt: bool = False,
    overlong: str = "truncate",
    skip_bad_records: bool = False,
    max_bad_fraction: float = 0.01,
    window_rows: int = 256,
    seed: int = 0,
    records_per_task: int = 50_000,
    num_cpus_per_task: float = 1.0,
    preserve_order: bool = True,
    pack: bool = True,
    validated: bool = False,
):
    """A Ray Dataset of packed rows (one row per packed row), built lazily by Ray Data tasks.

    With skip_bad_records off, the driver first runs `validate_data` over all records, so bad data
    fails before training starts with file:line: reason; ``validated``: the caller has (`train.preflight`), with
    ``format`` the format it detected, and the records are not read twice. Call after `ray.init`.

    Args:
        paths, tokenizer, seq_len, format, train_on_prompt, overlong, skip_bad_records, max_bad_fraction,
            window_rows, seed, pack: as for `open_stream` (tokenizer: an object or a folder path; a path
            keeps task arguments small).
        records_per_task: records per work unit (Ray task); more units = more parallel tokenization.
        num_cpus_per_task: CPUs Ray reserves per packing task (fractional is fine).
        preserve_order: rows come out in work-unit order, so the dataset (and a materialised copy of
            it) is the same sequence of rows for a given seed; set only on this dataset's own context.

    Returns:
        (dataset, stats_actor): `ray.data.Dataset` with columns input_ids / labels / position_ids
        (fixed_size_list<int32>[seq_len]) and seq_lens (list<int32>); `ray.get(stats_actor.get.remote())`
        gives the summed stats dict of the tasks that finished (every execution of the dataset adds
        to it: materialise once, as the trainer does, for counts of one pass).

    Raises:
        ValueError, FileNotFoundError, DataError: as for `open_stream` and `validate_data`.
    """
    import ray

    _check_options(format, overlong, seq_len)
    if records_per_task < 1:
        raise ValueError(f"records_per_task={records_per_task}: must be at least 1")
    files = expand_paths(paths)
    if not skip_bad_records and not (validated and format != "auto"):
        vstats = validate_data(files, format)
        format = detected_format(vstats)
    elif format == "auto":
        format = detect_data_format(files)
    units = []
    for path in files:
        n = count_records(path)
        for start in range(0, n, records_per_task):
            units.append({"path": path, "start": start, "stop": min(n, start + records_per_task), "unit": len(units)})
    if not units:
        raise DataError(f"{files[0]}: the inputs hold no records")
    actor = _make_stats_actor()
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        _pack_units,
        batch_size=1,
        batch_format="numpy",
        num_cpus=num_cpus_per_task,
        fn_kwargs={
            "tokenizer": os.fspath(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer,
            "format": format,
            "seq_len": seq_len,
            "train_on_prompt": train_on_prompt,
            "overlong": overlong,
            "skip_bad_records": skip_bad_records,
            "max_bad_fraction": max_bad_fraction,
            "window_rows": window_rows,
            "seed": seed,
            "pack": pack,
            "stats_actor": actor,
        },
    )
    # The dataset's context is its own copy (not the process-wide DataContext): this changes nothing else.
    ds.context.execution_options.preserve_order = preserve_order
    return ds, actor


def batch_to_tensors(batch) -> dict[str, Any]:
    """Turn packed rows into torch tensors for the model.

    Args:
        batch: a pyarrow Table / RecordBatch of packed rows, or a list of row dicts (open_stream).

    Returns:
        input_ids, labels, position_ids: int64 [B, seq_len]; seq_lens: int32 [B, max segments]
        zero-padded on the right (zeros are not segments).

    Raises:
        ValueError: an empty batch, or rows of different lengths.
    """
    import torch

    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    if isinstance(batch, pa.Table):
        if batch.num_rows == 0:
            raise ValueError("empty batch")
        batch = batch.combine_chunks()
        out = {}
        for k in ("input_ids", "labels", "position_ids"):
            col = batch.column(k).chunk(0)
            width = col.type.list_size
            flat = col.flatten().to_numpy(zero_copy_only=False)
            out[k] = torch.from_numpy(flat.reshape(-1, width).astype(np.int64))
        seq_lens = batch.column("seq_lens").to_pylist()
    else:
        rows = list(batch)
        if not rows:
            raise ValueError("empty batch")
        if len({len(r["input_ids"]) for r in rows}) != 1:
            raise ValueError("rows of different lengths in one batch")
        out = {
            k: torch.from_numpy(np.stack([r[k] for r in rows]).astype(np.int64))
            for k in ("input_ids", "labels", "position_ids")
        }
        seq_lens = [list(r["seq_lens"]) for r in rows]
    width = max(len(s) for s in seq_lens)
    padded = np.zeros((len(seq_lens), width), dtype=np.int32)
    for i, s in enumerate(seq_lens):
        padded[i, : len(s)] = s
    out["seq_lens"] = torch.from_numpy(padded)
    return out


def iter_torch_batches(shard, batch_size: int, *, drop_last: bool = False) -> Iterator[dict[str, Any]]:
    """Iterate a Ray Data shard (or Dataset) of packed rows as torch batches (see `batch_to_tensors`).

    Args:
        shard: `ray.train.get_dataset_shard("train")` in a worker, or a `ray.data.Dataset`.
        batch_size: rows per batch.
        drop_last: drop a last, smaller batch.

    Yields:
        Dicts of CPU tensors; the worker moves them to its device.
    """
    for b in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=drop_last):
        yield batch_to_tensors(b)
