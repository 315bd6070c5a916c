"""A finished (or interrupted) sweep's results: the sorted table, CSV/JSON, the curves plot, the best adapter.

Each trial becomes one row: its id, status, the values it was given, the metric at its last report
(what Tune's default `scope="last"` compares, and what the exported adapter was trained to), the
best value it reached, the steps it ran and, for a failed trial, the last line of its error. The
status tells a trial that ran all `train.max_steps` ("done") from one ASHA stopped ("stopped"),
one that failed ("error") and one an interruption left behind ("unfinished"); only a complete
sweep exports its best trial.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

from raytune_llm.config import RunConfig
from raytune_llm.config_save import save_config
from raytune_llm.tune.space import SweepSpec, apply_overrides

_STATUS = {"ERROR": "error", "PENDING": "unfinished", "RUNNING": "unfinished", "PAUSED": "unfinished"}


def _error_line(error) -> str:
    """The most specific line of a trial's (Ray-wrapped) exception."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    line = (named or lines or [type(error).__name__])[-1]
    return line if len(line) <= 200 else line[:197] + "..."


def _finite(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def collect(grid, spec: SweepSpec, max_steps: int, saved_status: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid, sorted best first by `spec.metric` (missing values last).

    Args:
        grid: what `Tuner.fit()` returned.
        spec: the sweep (metric, mode, keys of the space).
        max_steps: train.max_steps, to tell a finished trial from an early-stopped one.
        saved_status: trial id -> status in the saved experiment state (what a resume goes by). After an
            interruption Tune's in-memory trials read TERMINATED while the saved state keeps RUNNING.
    """
    # ResultGrid[i] is the result of the i-th trial of its analysis; the Trial object carries the status.
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or [None] * len(grid)
    rows = []
    for trial, result in zip(trials, grid):
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if history is not None and spec.metric in history and "step" in history:
            curve = [
                (int(s), float(v))
                for s, v in zip(history["step"], history[spec.metric])
                if _finite(v) is not None and _finite(s) is not None
            ]
        steps = int(metrics.get("step", 0) or 0)
        raw = trial.status if trial is not None else ("ERROR" if result.error else "TERMINATED")
        if trial is not None and saved_status and trial.trial_id in saved_status:
            raw = saved_status[trial.trial_id]
        status = _STATUS.get(raw, "done" if steps >= max_steps else "stopped")
        if result.error is not None:
            status = "error"
        values = [v for _, v in curve]
        best = None
        if values:
            best = min(values) if spec.mode == "min" else max(values)
        # A trial that failed before its first report in a resumed sweep comes back without a config on its Result.
        config = result.config or (trial.config if trial is not None else None) or {}
        rows.append(
            {
                "trial": trial.trial_id if trial is not None else metrics.get("trial_id", Path(result.path).name),
                "status": status,
                **{key: config.get(key) for key in spec.space},
                spec.metric: _finite(metrics.get(spec.metric)),
                f"best_{spec.metric}": best,
                "steps": steps,
                "checkpoint": metrics.get("checkpoint_path"),
                "error": _error_line(result.error) if result.error is not None else None,
                "curve": curve,
            }
        )
    sign = 1.0 if spec.mode == "min" else -1.0
    rows.sort(key=lambda r: (r[spec.metric] is None, sign * (r[spec.metric] or 0.0), r["trial"]))
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def table_text(rows: list[dict], spec: SweepSpec) -> str:
    """The rows as an aligned text table (rank 1 = best)."""
    cols = ["trial", "status", *spec.space, spec.metric, f"best_{spec.metric}", "steps", "error"]
    cells = [["rank", *cols]] + [[str(i + 1), *(_fmt(r[c]) for c in cols)] for i, r in enumerate(rows)]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def plot_curves(rows: list[dict], spec: SweepSpec, path: Path) -> None:
    """One line per trial: the metric at each evaluation; early-stopped trials end early, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for i, r in enumerate(rows):
        if not r["curve"]:
            continue
        steps, values = zip(*r["curve"])
        style = "--" if r["status"] == "stopped" else "-"
        ax.plot(steps, values, style, marker="o", ms=3, lw=1.3, label=f"#{i + 1} {r['trial']} ({r['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"sweep: {spec.metric} per trial (dashed: stopped by ASHA)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def export_best(row: dict, spec: SweepSpec, cfg: RunConfig, folder: Path, use_gpu: bool) -> Path:
    """Make `folder/best` a run folder of the best trial and export its adapter in PEFT format.

    Returns:
        The exported adapter folder (best/exports/adapter).
    """
    from ray.train import Checkpoint

    from raytune_llm.export import export
    from raytune_llm.export.safety import write_run_meta

    best = folder / "best"
    record = {k: v for k, v in row.items() if k != "curve"}
    same = (best / "trial.json").is_file() and json.loads((best / "trial.json").read_text()) == json.loads(
        json.dumps(record)
    )
    # The same best trial again (a finished sweep run once more): keep what the user exported from it since.
    kept = best / "exports" if same and (best / "exports").is_dir() else None
    if kept is not None:
        kept = kept.rename(folder / ".best-exports-kept")
    shutil.rmtree(best, ignore_errors=True)
    best.mkdir(parents=True)
    if kept is not None:
        kept.rename(best / "exports")
    trial_cfg = apply_overrides(cfg, {key: row[key] for key in spec.space})
    with Checkpoint(row["checkpoint"]).as_directory() as d:
        shutil.copytree(Path(d) / "adapter", best / "adapter")
        shutil.copy(Path(d) / "metrics.jsonl", best / "metrics.jsonl")
    write_run_meta(best / "adapter", trial_cfg, use_gpu)
    save_config(trial_cfg, best / "config.yaml")
    (best / "trial.json").write_text(json.dumps(record, indent=1) + "\n")
    return export(best, "adapter", dtype="auto", force=True)


def write_results(rows: list[dict], spec: SweepSpec, folder: Path, cfg: RunConfig, use_gpu: bool) -> str:
    """Write results.csv, results.json and curves.png; export the best trial when the sweep is complete.

    Returns:
        The text the CLI prints: the table, then where everything went.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cols = ["trial", "status", *spec.space, spec.metric, f"best_{spec.metric}", "steps", "error", "checkpoint"]
    with (folder / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", *cols])
        for i, r in enumerate(rows):
            w.writerow([i + 1, *(json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in cols)])
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    not_started = max(0, spec.num_trials - len(rows))
    complete = not unfinished and not not_started
    ranked = [r for r in rows if r[spec.metric] is not None and r["checkpoint"]]
    best = ranked[0] if ranked and complete else None
    summary: dict[str, Any] = {
        "metric": spec.metric,
        "mode": spec.mode,
        "complete": complete,
        "not_started": not_started,
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("done", "stopped", "error", "unfinished")},
        "best": None,
        "best_adapter": None,
        "trials": rows,
    }
    plot_curves(rows, spec, folder / "curves.png")
    lines = [table_text(rows, spec), ""]
    if best is not None:
        summary["best"] = best["trial"]
        summary["best_adapter"] = str(export_best(best, spec, cfg, folder, use_gpu))
        lines.append(f"best trial {best['trial']}: {spec.metric} {best[spec.metric]:.4g}")
        lines.append(f"best adapter (PEFT): {summary['best_adapter']}")
    elif not complete:
        lines.append(
            f"sweep interrupted: {len(unfinished)} trial(s) unfinished, {not_started} not started; "
            "run the same command again to resume"
        )
    else:
        lines.append(f"no trial reported {spec.metric}; see the errors above")
    (folder / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines.append(f"results: {folder / 'results.csv'}, {folder / 'results.json'}, {folder / 'curves.png'}")
    return "\n".join(lines)
