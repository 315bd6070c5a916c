"""Packing tokenized examples into fixed-length rows (best-fit-decreasing in a streaming window).

A packed row holds exactly `seq_len` tokens: several whole examples back to back, then
padding. Per row: `input_ids`, `labels` (aligned with input_ids, the model shifts; -100 on
prompt tokens, on padding, and on the first token of every example so the shifted loss never
predicts one example from the previous one), `position_ids` (restart at 0 for every example
and for the padding segment) and `seq_lens` (the segment lengths, padding last; they sum to
`seq_len`).

Examples arrive as a stream. We buffer a window of about `window_rows * seq_len` tokens,
place the examples with best-fit-decreasing (longest first, each into the open row whose
free space is the smallest that still fits), build the window's rows with a few vectorised
numpy gathers, shuffle their order with a generator seeded by (seed, window index), and
emit them. Windows are independent, so the only waste is the last, partly filled row of
each window (about 1 / (2 * window_rows)) plus what BFD cannot fill: >99% non-pad on a
log-normal length mix at window_rows=256 (bench/packing/bench_packing.py).

Resume: a window is a deterministic function of the records it starts at, so the stream's
position is three integers (`PackedStream.state_dict`): the records consumed before the
current window, the window's index, and the rows of it already yielded.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import pyarrow as pa

IGNORE_INDEX = -100


class Example(NamedTuple):
    """One tokenized example: `labels` aligned with `input_ids`, IGNORE_INDEX where no loss."""

    input_ids: np.ndarray
    labels: np.ndarray


def fit_length(example: Example, seq_len: int, overlong: str) -> list[Example]:
    """Apply the over-long policy to one example.

    Args:
        example: the tokenized example.
        seq_len: the packed row length.
        overlong: "truncate" (keep the first seq_len tokens), "drop", or "split" (cut into
            pieces of at most seq_len tokens, each trained as its own example).

    Returns:
        The pieces to pack: the example itself when it fits, [] when dropped.

    Raises:
        ValueError: unknown `overlong` policy.
    """
    n = len(example.input_ids)
    if n <= seq_len:
        return [example]
    if overlong == "truncate":
        return [Example(example.input_ids[:seq_len], example.labels[:seq_len])]
    if overlong == "drop":
        return []
    if overlong == "split":
        return [
            Example(example.input_ids[i : i + seq_len], example.labels[i : i + seq_len]) for i in range(0, n, seq_len)
        ]
    raise ValueError(f"overlong={overlong!r}: expected 'truncate', 'drop' or 'split'")


def has_trainable_token(labels: np.ndarray) -> bool:
    """Whether an example contributes to the loss once its first token is masked (see module doc)."""
    return bool(len(labels) > 1 and (labels[1:] != IGNORE_INDEX).any())


def best_fit_decreasing(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Assign items to bins of capacity `seq_len`, longest first, each into the tightest bin that fits.

    Args:
        lengths: item lengths, each in [1, seq_len].
        seq_len: bin capacity.

    Returns:
        Bins as lists of item indices, in the order the bins were opened; deterministic (stable sort).

    Raises:
        ValueError: an item is empty or longer than `seq_len`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > seq_len):
        raise ValueError(f"item lengths must be in [1, {seq_len}], got [{lengths.min()}, {lengths.max()}]")
    bins: list[list[int]] = []
    # Free space of the open bins, kept sorted, with the bin index as tie-break: bisect finds the
    # tightest fit in O(log n); inserts are memmoves over at most a window's bins (~hundreds).
    free: list[tuple[int, int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def build_rows(examples: list[Example], bins: list[list[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Materialise packed rows from a bin assignment with vectorised gathers.

    Args:
        examples: the window's examples.
        bins: lists of indices into `examples`, each summing to at most `seq_len` tokens.
        seq_len: row length.
        pad_id: token id of padding.

    Returns:
        {"input_ids", "labels", "position_ids": int32 [rows, seq_len], "seq_lens": int32 flat
        segment lengths, "seq_lens_offsets": int32 [rows + 1] (row r's segments are
        seq_lens[offsets[r]:offsets[r+1]])}.
    """
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64)
    lens = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    n_rows = len(bins)
    ids_flat = np.concatenate([examples[i].input_ids for i in order]).astype(np.int32, copy=False)
    lab_flat = np.concatenate([examples[i].labels for i in order]).astype(np.int32, copy=True)
    seg_lens = lens[order]
    total = int(seg_lens.sum())
    seg_starts = np.cumsum(seg_lens) - seg_lens  # start of each example in the flat stream
    # An example's first label predicts nothing from its own tokens: mask it (see module doc).
    lab_flat[seg_starts] = IGNORE_INDEX
    per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=n_rows)
    row_of_seg = np.repeat(np.arange(n_rows), per_row)
    fill = np.bincount(row_of_seg, weights=seg_lens, minlength=n_rows).astype(np.int64)
    row_starts = np.cumsum(fill) - fill
    # Destination of each flat token: row * seq_len + its offset inside the row.
    tok_row = np.repeat(row_of_seg, seg_lens)
    dest = tok_row * seq_len + (np.arange(total) - row_starts[tok_row])
    pos_in_ex = np.arange(total) - np.repeat(seg_starts, seg_lens)

    input_ids = np.full(n_rows * seq_len, pad_id, dtype=np.int32)
    labels = np.full(n_rows * seq_len, IGNORE_INDEX, dtype=np.int32)
    # Padding is its own segment: its positions restart at 0 like an example's.
    position_ids = (np.arange(seq_len)[None, :] - fill[:, None]).astype(np.int32).reshape(-1)
    input_ids[dest] = ids_flat
    labels[dest] = lab_flat
    position_ids[dest] = pos_in_ex

    pad = seq_len - fill
    # Segment lengths per row with a trailing padding segment where the row is not full.
    counts = per_row + (pad > 0)
    offsets = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    seq_lens = np.empty(int(offsets[-1]), dtype=np.int32)
    is_ex = np.ones(len(seq_lens), dtype=bool)
    is_ex[(offsets[1:] - 1)[pad > 0]] = False
    seq_lens[is_ex] = seg_lens
    seq_lens[~is_ex] = pad[pad > 0]
    return {
        "input_ids": input_ids.reshape(n_rows, seq_len),
        "labels": labels.reshape(n_rows, seq_len),
        "position_ids": position_ids.reshape(n_rows, seq_len),
        "seq_lens": seq_lens,
        "seq_lens_offsets": offsets,
    }


def rows_to_arrow(rows: dict[str, np.ndarray]) -> pa.Table:
    """Convert `build_rows` output to a pyarrow Table (fixed-size lists + a list of seq_lens)."""
    n_rows, seq_len = rows["input_ids"].shape
    cols = {
        k: pa.FixedSizeListArray.from_arrays(pa.array(rows[k].reshape(-1)), seq_len)
        for k in ("input_ids", "labels", "position_ids")
    }
    cols["seq_lens"] = pa.ListArray.from_arrays(pa.array(rows["seq_lens_offsets"]), pa.array(rows["seq_lens"]))
    return pa.table(cols)


def split_rows(rows: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split `build_rows` output into one dict per row (seq_lens as its own small array)."""
    off = rows["seq_lens_offsets"]
    return [
        {
            "input_ids": rows["input_ids"][r],
            "labels": rows["labels"][r],
            "position_ids": rows["position_ids"][r],
            "seq_lens": rows["seq_lens"][off[r] : off[r + 1]],
        }
        for r in range(len(off) - 1)
    ]


def pack_window(
    examples: list[Example], seq_len: int, pad_id: int, seed: int, window: int, pack: bool = True
) -> dict[str, np.ndarray]:
    """Pack one window: BFD, build rows, shuffle the row order with rng(seed, window).

    Args:
        examples: the window's examples, each of 1..seq_len tokens.
        seq_len: row length.
        pad_id: padding token id.
        seed: run seed.
        window: the window's index in the stream (so every window gets its own row order).
        pack: False puts each example in a row of its own (padded to `seq_len`), as `data.pack: false` asks.

    Returns:
        `build_rows` output with rows in shuffled order.
    """
    lens = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    bins = best_fit_decreasing(lens, seq_len) if pack else [[i] for i in range(len(examples))]
    # BFD opens the rows of long examples first; shuffling keeps a window from feeding the
    # model all its long examples in a row.
    perm = np.random.default_rng([seed, window]).permutation(len(bins))
    return build_rows(examples, [bins[i] for i in perm], seq_len, pad_id)


def pack_examples(
    examples: Iterable[Example], seq_len: int, pad_id: int, *, window_rows: int = 256, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Pack a stream of examples into rows of exactly `seq_len` tokens.

    Args:
        examples: tokenized examples of 1..seq_len tokens (apply `fit_length` first).
        seq_len: row length.
        pad_id: padding token id.
        window_rows: packing window, in rows' worth of tokens.
        seed: seed of the per-window row shuffle.

    Yields:
        One dict per row: input_ids, labels, position_ids (int32 [seq_len]) and seq_lens (int32 [k]).
    """
    stream = PackedStream(lambda skip: iter(examples), seq_len, pad_id, window_rows=window_rows, seed=seed)
    yield from stream


# A source yields one item per input record: an Example, a list of pieces, or None (dropped).
SourceItem = Example | list[Example] | None
SourceFactory = Callable[[int], Iterator[SourceItem]]


class PackedStream:
    """Iterable of packed rows over a record source, with a checkpointable position.

    `source(skip)` must return an iterator over the records after the first `skip` ones, the same
    sequence every call (that is what makes resume exact). One item per record keeps the record
    count, and so the resume position, independent of how many examples a record became.
    """

    def __init__(
        self,
        source: SourceFactory,
        seq_len: int,
        pad_id: int,
        *,
        window_rows: int = 256,
        seed: int = 0,
        pack: bool = True,
    ):
        """Create the stream.

        Args:
            source: factory of record iterators, see the class doc.
            seq_len: row length.
            pad_id: padding token id.
            window_rows: packing window, in rows' worth of tokens.
            seed: seed of the per-window row shuffle.
            pack: False: one example per row (see `pack_window`).

        Raises:
            ValueError: non-positive seq_len or window_rows.
        """
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: must be at least 2")
        if window_rows < 1:
            raise ValueError(f"window_rows={window_rows}: must be at least 1")
        self.source = source
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.window_rows = window_rows
        self.seed = seed
        self.pack = pack
        self._state = {"records": 0, "window": 0, "rows": 0}

    def state_dict(self) -> dict[str, int]:
        """The stream's position: JSON-able, a few integers. Valid at any point between rows."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position returned by `state_dict` (the next row is the one after it).

        Raises:
            ValueError: `state` lacks a key or holds a negative value.
        """
        try:
            new = {k: int(state[k]) for k in ("records", "window", "rows")}
        except KeyError as e:
            raise ValueError(f"packing state is missing {e.args[0]!r}: expected records, window, rows") from None
        if min(new.values()) < 0:
            raise ValueError(f"packing state has a negative value: {new}")
        self._state = new

    def _windows(self) -> Iterator[tuple[int, list[Example]]]:
        """Yield (records consumed after this window, examples) from the current position."""
        budget = self.window_rows * self.seq_len
        records = self._state["records"]
        buf: list[Example] = []
        tokens = 0
        for item in self.source(records):
            records += 1
            if item is None:
                continue
            for ex in [item] if isinstance(item, Example) else item:
                if len(ex.input_ids) > self.seq_len:
                    raise ValueError(
                        f"example of {len(ex.input_ids)} tokens > seq_len={self.seq_len}: fit_length first"
                    )
                if len(ex.input_ids):
                    buf.append(ex)
                    tokens += len(ex.input_ids) if self.pack else self.seq_len  # unpacked: a whole row each
            if tokens >= budget:
                yield records, buf
                buf, tokens = [], 0
        if buf:
            yield records, buf

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield rows from the current position on, updating `state_dict()` as rows go out."""
        for records_after, buf in self._windows():
            self._window_loaded()
            rows = split_rows(pack_window(buf, self.seq_len, self.pad_id, self.seed, self._state["window"], self.pack))
            for r in range(self._state["rows"], len(rows)):
                self._state["rows"] = r + 1
                yield rows[r]
            self._state = {"records": records_after, "window": self._state["window"] + 1, "rows": 0}
            self._window_finished()

    def _window_loaded(self) -> None:
        """Hook: the source has just been read up to the end of the current window."""

    def _window_finished(self) -> None:
        """Hook: every row of the current window has been yielded and the position moved past it."""
