"""Check the reduced-depth stand-in of the max-context search against a real deeper model.

``max_context.py --reduced-layers K`` runs K decoder layers and holds the resident memory of the other
layers as one ballast tensor (``run_stack.py --stand-for-layers``). This runs, at one length, a model of
``--deep`` layers and one of ``--deep - 1`` layers standing for ``--deep``, and compares:

- memory after load: the deeper model's extra allocation against the counted per-layer bytes at load;
- peak memory of one full step: the stand-in against the real deeper model (the method is sound when the
  stand-in's peak is at or a little above the real one: its ballast also holds AdamW states that a
  first step has not allocated yet).

Writes ``bench/results/ballast_check_<gpu>_<yyyymmdd>.json`` (copied into ``$OUT``).

Usage::

    python bench/e2e/check_ballast.py --synthetic 70b --deep 3 --seq 16384
    python bench/e2e/check_ballast.py --tiny      # CPU: proves the script, no memory figures
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import E2E_DIR, RESULTS_DIR, child_env, environment, gpu_slug, log, utc_day, write_json  # noqa: E402
from bench_e2e import run_child  # noqa: E402
from max_context import gpu_name  # noqa: E402


def one(args: argparse.Namespace, layers: int, stand_for: int | None) -> dict:
    out = Path("/tmp") / f"rtl_ballast_{layers}_{stand_for}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(E2E_DIR / "run_stack.py"), "--stack", "ours", "--batch", "1", "--seq", str(args.seq)]
    cmd += ["--synthetic", "tiny70b" if args.tiny else args.synthetic, "--layers", str(layers)]
    cmd += ["--warmup", "0", "--steps", "1", "--ckpt", args.ckpt, "--out", str(out)]
    cmd += ["--tiny"] if args.tiny else ["--mem-cap-gib", str(args.cap_gib)]
    if stand_for:
        cmd += ["--stand-for-layers", str(stand_for)]
    rc, secs = run_child(cmd, child_env("ours"), args.timeout_s)
    res = json.loads(out.read_text()) if out.is_file() else {"status": "error", "error": f"no result (rc {rc})"}
    keep = ("status", "peak_gib", "allocated_after_load_gib", "layer_at_load_mib", "layer_resident_mib", "ballast_gib")
    row = {"layers": layers, "stands_for_layers": stand_for, "wall_s": round(secs, 1)}
    row.update({k: res.get(k) for k in keep})
    log(f"check_ballast: {row}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="reduced-depth + ballast vs the real deeper model")
    p.add_argument("--synthetic", default="70b")
    p.add_argument("--deep", type=int, default=3, help="layers of the real model (the stand-in has one fewer)")
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--ckpt", default="offload", choices=("on", "offload"))
    p.add_argument("--cap-gib", type=float, default=80.0)
    p.add_argument("--timeout-s", type=float, default=240.0)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.deep = 64, 2
    t0 = time.perf_counter()
    real = one(args, args.deep, None)
    stand_in = one(args, args.deep - 1, args.deep)
    doc = {
        "bench": "ballast_check",
        "synthetic": args.synthetic,
        "seq": args.seq,
        "ckpt": args.ckpt,
        "real": real,
        "stand_in": stand_in,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if real.get("allocated_after_load_gib") is not None and stand_in.get("allocated_after_load_gib") is not None:
        doc["load_delta_mib"] = round(
            1024 * (real["allocated_after_load_gib"] - stand_in["allocated_after_load_gib"]), 1
        )
        doc["counted_layer_at_load_mib"] = stand_in.get("layer_at_load_mib")
    if real.get("peak_gib") is not None and stand_in.get("peak_gib") is not None:
        doc["peak_stand_in_minus_real_gib"] = round(stand_in["peak_gib"] - real["peak_gib"], 3)
    gpu = gpu_name(args.tiny)
    out = (
        RESULTS_DIR / f"ballast_check_{gpu_slug(gpu)}_{utc_day()}.json"
        if not args.tiny
        else Path("/tmp/ballast_tiny.json")
    )
    write_json(out, doc)
    print(
        json.dumps(
            {k: doc.get(k) for k in ("load_delta_mib", "counted_layer_at_load_mib", "peak_stand_in_minus_real_gib")}
        )
    )
    return 0 if real["status"] == stand_in["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
