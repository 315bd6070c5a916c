"""SwiGLU launch settings on the GPU: block width and warps of the forward and backward kernels, beside Liger-Kernel.

Runs bench_swiglu's providers (ours under each `kernels.swiglu._FWD` / `_BWD` setting, and Liger once) at its
shapes with the harness's timing and prints ours/Liger per setting and direction.

    python bench/kernels/sweep_swiglu.py --out $OUT/swiglu_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench_swiglu  # noqa: E402
from _harness import Harness, environment  # noqa: E402

from raytune_llm.kernels import swiglu as mod  # noqa: E402

SETTINGS = "1024:4,2048:4,2048:8,4096:8,4096:16,8192:16,16384:16,16384:32"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--settings", default=SETTINGS, help="BLOCK:warps pairs, applied to both kernels")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    h = Harness(reps=args.reps)
    h.compile = lambda fn: None  # torch.compile is not what this sweep compares
    settings = [None] + [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]
    rows = []
    for setting in settings:
        mod._FWD = mod._BWD = setting
        for r in bench_swiglu.run(h):
            if r.ms is None or r.provider not in ("ours", "liger") or (r.provider == "liger" and setting):
                continue
            rows.append(dict(setting=None if r.provider == "liger" else (list(setting) if setting else "default"),
                             provider=r.provider, shape=r.shape, mode=r.mode, ms=round(r.ms, 4),
                             peak_extra_mib=r.peak_extra_mib, bandwidth_fraction=r.bandwidth_fraction))  # fmt: skip
    mod._FWD = mod._BWD = None
    liger = {(r["shape"], r["mode"]): r["ms"] for r in rows if r["provider"] == "liger"}
    for r in rows:
        if r["provider"] == "ours" and (r["shape"], r["mode"]) in liger:
            r["speedup_vs_liger"] = round(liger[(r["shape"], r["mode"])] / r["ms"], 3)
    doc = {"bench": "swiglu_sweep", "copy_gbps": round(h.copy_gbps, 1), "environment": environment(), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    for r in rows:
        print(f"{r['shape']:<12} {r['mode']:<8} {r['provider']:<6} {r['setting']!s:<12} {r['ms']:8.4f} ms "
              f"bw {r['bandwidth_fraction']} vs liger {r.get('speedup_vs_liger')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
