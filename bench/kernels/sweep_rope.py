"""RoPE launch settings on the GPU: warps per program, forward + backward beside Liger-Kernel.

Runs bench_rope's providers (ours under each `kernels.rope._NUM_WARPS`, and Liger) at its shapes with the
harness's timing, and prints ours/Liger per setting.

    python bench/kernels/sweep_rope.py --out $OUT/rope_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench_rope  # noqa: E402
from _harness import Harness, environment  # noqa: E402

from raytune_llm.kernels import rope as mod  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warps", default="2,4,8,16")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    h = Harness(reps=args.reps)
    h.compile = lambda fn: None  # torch.compile is not what this sweep compares
    rows = []
    for warps in [None] + [int(w) for w in args.warps.split(",")]:
        mod._NUM_WARPS = warps
        for r in bench_rope.run(h):
            if r.ms is None or r.provider not in ("ours", "liger") or (r.provider == "liger" and warps is not None):
                continue
            rows.append(dict(warps=warps if r.provider == "ours" else None, provider=r.provider, shape=r.shape,
                             mode=r.mode, ms=round(r.ms, 4), bandwidth_fraction=r.bandwidth_fraction))  # fmt: skip
    mod._NUM_WARPS = None
    liger = {(r["shape"], r["mode"]): r["ms"] for r in rows if r["provider"] == "liger"}
    for r in rows:
        if r["provider"] == "ours" and (r["shape"], r["mode"]) in liger:
            r["speedup_vs_liger"] = round(liger[(r["shape"], r["mode"])] / r["ms"], 3)
    doc = {"bench": "rope_sweep", "copy_gbps": round(h.copy_gbps, 1), "environment": environment(), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    for r in rows:
        if r["mode"] == "full":
            print(f"{r['shape']:<20} {r['provider']:<6} warps={r['warps']!s:<5} {r['ms']:8.4f} ms "
                  f"bw {r['bandwidth_fraction']} vs liger {r.get('speedup_vs_liger')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
