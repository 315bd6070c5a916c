"""Bad-record policy, data statistics, and the validation pass run before training.

By default one bad record fails the run before training with one line, `file:line: reason`
(`DataError`). With `skip_bad_records=True`, bad records are counted by reason, the first
`report_first` are logged (warning) and kept with their file:line (`DataStats.first_bad`), and the run aborts once their share
of the records seen passes `max_bad_fraction` (checked after every record once `min_records`
have been seen, so one early bad line does not abort a large file, and once more at the end).

`DataStats.as_dict()` is the flat, JSON-able stats dict the trainer adds to its metrics.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence

from .formats import check_record, detect_format
from .readers import DataError, expand_paths, iter_records

log = logging.getLogger(__name__)


# The share check starts after this many records: at 1% a single bad line among the first
# hundred would otherwise abort a run that is 99.99% clean.
MIN_RECORDS_FOR_SHARE = 1000


class DataStats:
    """Counts of what happened to the records: read, bad (by reason), dropped, over-long, tokens."""

    def __init__(self, skip_bad_records: bool = False, max_bad_fraction: float = 0.01, report_first: int = 5):
        """Create the counters and the bad-record policy.

        Args:
            skip_bad_records: count and skip bad records instead of failing on the first one.
            max_bad_fraction: abort (DataError) once bad records exceed this share of records seen.
            report_first: how many bad records to keep with file:line for the log.

        Raises:
            ValueError: `max_bad_fraction` outside [0, 1].
        """
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction}: must be in [0, 1]")
        self.skip_bad_records = skip_bad_records
        self.max_bad_fraction = max_bad_fraction
        self.report_first = report_first
        self.counts: Counter[str] = Counter()
        self.bad_reasons: Counter[str] = Counter()
        self.first_bad: list[str] = []

    def bad(self, where: str, code: str, message: str) -> None:
        """Record one bad record (already counted in `records`).

        Args:
            where: `file:line`.
            code: short reason key for the counts (e.g. "invalid_json", "missing_field").
            message: the human-readable reason.

        Raises:
            DataError: skipping is off, or the bad share passed the limit.
        """
        if not self.skip_bad_records:
            raise DataError(f"{where}: {message} (data.on_bad_record=skip counts and skips bad records)")
        self.counts["bad_records"] += 1
        self.bad_reasons[code] += 1
        if len(self.first_bad) < self.report_first:
            self.first_bad.append(f"{where}: {message}")
            log.warning("skipping bad record %s: %s", where, message)
        if self.counts["records"] >= MIN_RECORDS_FOR_SHARE:
            self.check_share()

    def check_share(self) -> None:
        """Raise DataError when bad records exceed `max_bad_fraction` of the records seen.

        Raises:
            DataError: the share is over the limit; the message lists the counts and the first bad records.
        """
        records, bad = self.counts["records"], self.counts["bad_records"]
        if records and bad / records > self.max_bad_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_reasons.items()))
            first = "; ".join(self.first_bad)
            raise DataError(
                f"{bad} of {records} records are bad ({bad / records:.2%} > max_bad_fraction="
                f"{self.max_bad_fraction}): {reasons}; first: {first}"
            )

    def as_dict(self) -> dict[str, int]:
        """Flat JSON-able counts: records, bad_records, bad/<reason>, dropped_*, overlong_*, examples, tokens, ..."""
        out = {k: int(v) for k, v in self.counts.items()}
        out.setdefault("records", 0)
        out.setdefault("bad_records", 0)
        out.update({f"bad/{k}": int(v) for k, v in self.bad_reasons.items()})
        return out

    def load_dict(self, d: dict[str, int]) -> None:
        """Restore counts saved with `as_dict` (bad-record examples are not restored)."""
        self.counts = Counter({k: v for k, v in d.items() if not k.startswith("bad/")})
        self.bad_reasons = Counter({k[4:]: v for k, v in d.items() if k.startswith("bad/")})


def detected_format(stats: dict[str, int]) -> str | None:
    """The format `validate_data` detected (its ``format/<name>`` key), or None in stats without one."""
    return next((k.removeprefix("format/") for k in stats if k.startswith("format/")), None)


def validate_data(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    format: str = "auto",
    *,
    skip_bad_records: bool = False,
    max_bad_fraction: float = 0.01,
) -> dict[str, int]:
    """Scan every record's JSON and schema once, before training (no tokenization).

    Args:
        paths: files, folders or globs (see readers.expand_paths).
        format: "auto", "text", "prompt_completion", "alpaca" or "chat".
        skip_bad_records: count bad records instead of failing on the first.
        max_bad_fraction: abort when bad records exceed this share.

    Returns:
        The stats dict (records, bad_records, bad/<reason>) plus "format": the detected format as
        a key "format/<name>" = 1.

    Raises:
        DataError: a bad record (skipping off), too many bad records, or no valid record at all.
        FileNotFoundError: a path matches nothing.
    """
    files = expand_paths(paths)
    stats = DataStats(skip_bad_records, max_bad_fraction)
    fmt = None if format == "auto" else format
    for rec in iter_records(files):
        stats.counts["records"] += 1
        if rec.error is None and fmt is None:
            fmt = detect_format(rec.value)
        if rec.error is not None:
            stats.bad(rec.where, "invalid_json", rec.error)
            continue
        if fmt is None:
            stats.bad(rec.where, "unknown_format", "record matches no known format " + _keys(rec.value))
            continue
        problem = check_record(fmt, rec.value)
        if problem is not None:
            stats.bad(rec.where, problem[0], problem[1])
    if fmt is None:
        raise DataError(f"{files[0]}: no valid record found in {len(files)} input(s)")
    stats.check_share()
    out = stats.as_dict()
    out[f"format/{fmt}"] = 1
    return out


def _keys(value) -> str:
    return f"(keys: {sorted(value)[:8]})" if isinstance(value, dict) else f"(a JSON {type(value).__name__})"
