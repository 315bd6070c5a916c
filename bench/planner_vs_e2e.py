"""The memory planner against peaks already measured on the GPU: no GPU needed to run it.

Reads an end-to-end result (`bench/results/e2e_*.json`, written by `bench/e2e/bench_e2e.py` on the H200:
Llama-3.1-8B shapes, NF4 base, LoRA r=16 on all seven projections, checkpointing on, torch AdamW, peak =
`torch.cuda.max_memory_allocated` over the timed steps), predicts each measured (shape, stack) with
`plan_from_values` (ours: fused=True; standard QLoRA: fused=False) and records predicted vs measured with the
relative error. Goal (issue 7): |error| <= 15% on every case.

    .venv/bin/python bench/planner_vs_e2e.py bench/results/e2e_h200_20261128.json

Writes bench/results/planner_<gpu>_<yyyymmdd of the measurement>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raytune_llm.sharding.planner import plan_from_values  # noqa: E402

GOAL = 0.15
STACKS = {"ours": True, "std_qlora": False}  # stack name in the e2e JSON -> plan_from_values(fused=...)


def shape_values(shape: str) -> tuple[int, int]:
    """'4x2048' -> (micro_batch 4, seq 2048); 'packed_8192' -> (1, 8192) (one packed row)."""
    if shape.startswith("packed_"):
        return 1, int(shape.split("_")[1])
    mb, seq = shape.split("x")
    return int(mb), int(seq)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("e2e_json", help="an e2e_*.json result with measured peaks")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    src = Path(args.e2e_json).resolve()
    e2e = json.loads(src.read_text())
    env = e2e["environment"]
    hf_config = e2e["model"]["config"]
    gpu_gib = float(env.get("gpu_total_gib") or 80.0)
    cases = []
    for shape, s in e2e["summary"].items():
        mb, seq = shape_values(shape)
        for stack, fused in STACKS.items():
            measured = (s.get("peak_gib") or {}).get(stack)
            if measured is None:
                continue
            plan = plan_from_values(
                hf_config, seq_len=seq, micro_batch=mb, checkpointing="on", gpu_mem_gib=gpu_gib, fused=fused
            )
            err = plan.peak_gib / measured - 1.0
            cases.append(
                {
                    "shape": shape,
                    "stack": stack,
                    "micro_batch": mb,
                    "seq_len": seq,
                    "measured_peak_gib": measured,
                    "predicted_peak_gib": round(plan.peak_gib, 3),
                    "rel_error": round(err, 4),
                    "within_goal": abs(err) <= GOAL,
                }
            )
    worst = max(cases, key=lambda c: abs(c["rel_error"]))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "summary": {
            "cases": len(cases),
            "within_goal": sum(c["within_goal"] for c in cases),
            "max_abs_rel_error": abs(worst["rel_error"]),
            "worst_case": f"{worst['shape']} {worst['stack']}",
            "goal_abs_rel_error": GOAL,
        },
        "source": str(src.relative_to(REPO) if src.resolve().is_relative_to(REPO) else src),
        "measured_on": {k: env.get(k) for k in ("gpu", "torch", "triton", "transformers", "bitsandbytes", "date_utc")},
        "measured_commit": env.get("git_commit"),
        "planner_commit": commit,
        "protocol": e2e.get("protocol"),
        "cases": cases,
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    gpu = str(env.get("gpu", "gpu")).lower().replace("nvidia ", "").replace(" ", "_")
    day = str(env.get("date_utc", ""))[:10].replace("-", "") or dt.date.today().strftime("%Y%m%d")
    path = Path(args.out) / f"planner_{gpu}_{day}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'shape':<13}{'stack':<11}{'measured GiB':>13}{'predicted':>11}{'error':>9}")
    for c in cases:
        print(
            f"{c['shape']:<13}{c['stack']:<11}{c['measured_peak_gib']:>13.2f}{c['predicted_peak_gib']:>11.2f}"
            f"{c['rel_error']:>+9.1%}"
        )
    print(f"{result['summary']['within_goal']}/{len(cases)} within {GOAL:.0%}; wrote {path}")
    return 0 if result["summary"]["within_goal"] == len(cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
