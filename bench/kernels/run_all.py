"""Run every ``bench_*.py`` in bench/kernels and write one JSON with a per-kernel summary.

Usage::

    python bench/kernels/run_all.py            # GPU: real shapes, all providers
    TRITON_INTERPRET=1 python bench/kernels/run_all.py --tiny   # CPU smoke run
    python bench/kernels/run_all.py --only rms_norm swiglu   # merges into the day's file

Each bench module follows the API in ``bench/_harness.py`` (``NAME``, ``GOALS``, optional
``BANDWIDTH_BOUND``, ``run(h) -> list[Record]``). One failing module is reported and the others
still run. The output is ``bench/results/kernels_<gpu>_<yyyymmdd>.json`` (``..._tiny.json`` for --tiny) with a top-level
``"summary"``: per kernel ``{"speedup_vs_liger", "speedup_vs_torch", "bandwidth_fraction", ...,
"goals"}``, null where not applicable.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/ for _harness
sys.path.insert(0, str(HERE.parent.parent))  # repo root for raytune_llm

import _harness  # noqa: E402


def load_benches(only: list[str] | None) -> list:
    """Import every bench module (sorted by file name), keeping those named in ``only`` if given."""
    mods = []
    for path in sorted(HERE.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if only and mod.NAME not in only:
            continue
        mods.append(mod)
    return mods


def main(argv: list[str] | None = None) -> int:
    """Run the benches, write the JSON, print the table and the summary; return an exit code."""
    args = _harness.parse_args(argv)
    h = _harness.Harness(tiny=args.tiny, reps=args.reps)
    records, summary, failed = [], {}, []
    for mod in load_benches(args.only):
        print(f"== {mod.NAME}", flush=True)
        try:
            recs = mod.run(h)
        except Exception:
            traceback.print_exc()
            failed.append(mod.NAME)
            continue
        records += recs
        summary[mod.NAME] = _harness.summarize(recs, mod.GOALS, getattr(mod, "BANDWIDTH_BOUND", True))
    out = _harness.write_results("kernels", records, summary, h, args.out, merge=bool(args.only))
    _harness.print_table(records, h.copy_gbps)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
