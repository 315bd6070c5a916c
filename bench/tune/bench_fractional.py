"""Fractional GPUs per trial: four small sweep trials sharing one GPU at once vs the same four one after another.

    .venv/bin/python bench/tune/bench_fractional.py            # GPU: 4 trials x 0.25 GPU
    .venv/bin/python bench/tune/bench_fractional.py --tiny     # CPU: proves the script end to end

Both modes run the same `raytune-llm sweep` (same base config, a 4-point grid over train.lr, no
early stopping, so both do identical work) through `run_sweep`, once with
max_concurrent_trials=4 and once with 1, on one Ray session. Small trials leave most of an H200
idle (at batch 1-8 a tiny model is launch-bound), which is what sharing a GPU is for: the figure of
merit is the trials' wall time sequential / concurrent (4.0 would be perfect sharing). Measured
per mode: the whole `run_sweep` call and the trials' span (first trial start to last trial end,
from Tune's per-trial reports), which leaves out the shared preparation (tokenizer, tiny model,
packed rows). Writes bench/results/tune_<gpu>_<yyyymmdd>.json (`_tiny` suffix with --tiny).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _harness import environment, gpu_slug  # noqa: E402

from raytune_llm.config import load_config  # noqa: E402


def base_overrides(args) -> list[str]:
    """The trial's run config: the quickstart's tiny Llama (wider on GPU), the bundled task, one worker."""
    if args.tiny:
        shape = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
        run = {"seq_len": 64, "num_examples": 400, "eval_examples": 40, "micro_batch_size": 4}
    else:
        shape = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2}
        run = {"seq_len": 256, "num_examples": 6000, "eval_examples": 200, "micro_batch_size": 8}
    return [
        *(f"model.tiny.{k}={v}" for k, v in shape.items()),
        f"data.seq_len={run['seq_len']}",
        f"data.num_examples={run['num_examples']}",
        f"data.eval_examples={run['eval_examples']}",
        "train.num_workers=1",
        f"train.cpus_per_worker={0.25 if args.tiny else 1.0}",  # --tiny: four trials fit 2 CPU cores
        f"train.micro_batch_size={run['micro_batch_size']}",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=2",
        f"train.log_every={args.steps}",
        "export.formats=[]",
    ]


def trial_windows(folder: Path) -> dict[str, list[float]]:
    """trial id -> [start, end] in seconds since the epoch, from Tune's per-trial result.json files."""
    out = {}
    for f in (folder / "tune").glob("*/result.json"):
        reports = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if reports:
            out[reports[0]["trial_id"]] = [
                reports[0]["timestamp"] - reports[0]["time_this_iter_s"],
                reports[-1]["timestamp"],
            ]
    return out


def trial_span(folder: Path) -> float:
    """Seconds from the first trial's start to the last trial's end."""
    w = trial_windows(folder)
    return max(e for _, e in w.values()) - min(s for s, _ in w.values()) if w else float("nan")


def max_overlap(windows: dict[str, list[float]]) -> int:
    """The most trials running at one moment (proof that they shared the GPU at once)."""
    events = sorted([(s, 1) for s, _ in windows.values()] + [(e, -1) for _, e in windows.values()])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def run_mode(args, out_dir: Path, concurrent: int) -> dict:
    from raytune_llm.tune.sweep import run_sweep

    name = f"bench-c{concurrent}"
    cfg = load_config(None, [*base_overrides(args), f"output_dir={out_dir}", f"name={name}"])
    lrs = [3e-3, 2e-3, 1e-3, 5e-4][: args.trials] + [1e-4] * max(0, args.trials - 4)
    cfg.sweep = {
        "space": {"train.lr": {"grid": lrs}},
        "metric": "eval_loss",
        "max_concurrent_trials": concurrent,
        "gpus_per_trial": args.fraction,
        "eval_every": max(1, args.steps // 4),
    }
    t0 = time.perf_counter()
    text = run_sweep(cfg, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    print(text, flush=True)
    folder = out_dir / f"{name}-sweep"
    summary = json.loads((folder / "results.json").read_text())
    return {
        "max_concurrent_trials": concurrent,
        "run_sweep_wall_s": round(wall, 2),
        "trials_span_s": round(trial_span(folder), 2),
        "max_trials_at_once": max_overlap(trial_windows(folder)),
        "trial_windows_s": {k: [round(a, 2), round(b, 2)] for k, (a, b) in trial_windows(folder).items()},
        "counts": summary["counts"],
        "trials": [{k: v for k, v in r.items() if k not in ("curve", "checkpoint")} for r in summary["trials"]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU-sized model and steps")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.25, help="GPUs per trial")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per trial (default 200; 12 with --tiny)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    args = ap.parse_args()
    args.steps = args.steps or (12 if args.tiny else 200)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAYTUNE_LLM_PROGRESS", "0")
    env = environment()
    if not args.tiny and env["gpu"] == "cpu":
        print("no CUDA GPU: run with --tiny on CPU", file=sys.stderr)
        return 2

    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    tag = f"_{args.tag}" if args.tag else ""
    path = Path(args.out) / f"tune_{gpu_slug(env)}_{day}{'_tiny' if args.tiny else ''}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"summary": {}, "tiny": args.tiny, "overrides": base_overrides(args), "modes": {}, "environment": env}
    with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp:
        # Written after each mode, so a run cut short still leaves the concurrent figures.
        concurrent = result["modes"]["concurrent"] = run_mode(args, Path(tmp), args.trials)
        path.write_text(json.dumps(result, indent=2) + "\n")
        sequential = result["modes"]["sequential"] = run_mode(args, Path(tmp), 1)
    speedup = sequential["trials_span_s"] / concurrent["trials_span_s"]
    cfg = load_config(None, base_overrides(args))
    tokens = args.trials * args.steps * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
    result["summary"] = {
        "trials": args.trials,
        "gpus_per_trial": args.fraction,
        "steps_per_trial": args.steps,
        "concurrent_trials_span_s": concurrent["trials_span_s"],
        "sequential_trials_span_s": sequential["trials_span_s"],
        "speedup": round(speedup, 3),
        "train_tokens_all_trials": tokens,
        "concurrent_tokens_per_s": round(tokens / concurrent["trials_span_s"], 1),
        "sequential_tokens_per_s": round(tokens / sequential["trials_span_s"], 1),
        "ideal_speedup": args.trials,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'mode':<12}{'trials span s':>15}{'run_sweep s':>14}")
    for mode, r in (("concurrent", concurrent), ("sequential", sequential)):
        print(f"{mode:<12}{r['trials_span_s']:>15.1f}{r['run_sweep_wall_s']:>14.1f}")
    print(
        f"speedup {speedup:.2f}x of an ideal {args.trials}x; training tokens/s over the trials' span: concurrent "
        f"{result['summary']['concurrent_tokens_per_s']}, sequential {result['summary']['sequential_tokens_per_s']}; "
        f"wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
