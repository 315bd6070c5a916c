"""NF4 dequantization launch settings on the GPU: elements and warps per program and the store path, beside bitsandbytes.

Runs bench_nf4's providers (ours under each `kernels.nf4._BLOCK` x `_NUM_WARPS` x `_PAIRS`, and bitsandbytes once)
at its shapes with the harness's timing and prints each setting's time and bandwidth fraction. Every setting is
first checked bit-exact against bitsandbytes on an odd and an even shape (both store paths).

    python bench/kernels/sweep_nf4.py --out $OUT/nf4_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench_nf4  # noqa: E402
from _harness import Harness, environment  # noqa: E402

from raytune_llm.kernels import nf4 as mod  # noqa: E402

SETTINGS = "2048:2:0,2048:2:1,2048:4:1,4096:4:1,4096:8:1,1024:2:1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--settings", default=SETTINGS, help="BLOCK:warps:pairs triples (pairs 1: 32-bit pair stores)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    h = Harness(reps=args.reps)
    h.compile = lambda fn: None  # torch.compile is not what this sweep compares
    default = (mod._BLOCK, mod._NUM_WARPS, mod._PAIRS)
    rows = []
    import bitsandbytes.functional as bnbF
    import torch

    checks = []
    for shape in ((4099, 1031), (4097, 1030)):  # odd and even n, each with a ragged last block
        w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
        checks += [bnbF.quantize_4bit(w, blocksize=b, compress_statistics=True, quant_type="nf4") for b in (64, 4096)]
    for i, setting in enumerate(tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")):
        mod._BLOCK, mod._NUM_WARPS, mod._PAIRS = setting[0], setting[1], bool(setting[2])
        exact = all(
            torch.equal(mod.nf4_dequantize(mod.NF4Weight.from_bnb(pk, qs)), bnbF.dequantize_4bit(pk, qs))
            for pk, qs in checks
        )
        rows.append(dict(setting=list(setting), provider="ours", shape="bit_exact_vs_bnb", exact=exact))
        print(f"setting {setting}: bit-exact against bitsandbytes (4099x1031, 4097x1030; blocksize 64, 4096): {exact}")
        for r in bench_nf4.run(h):
            if r.ms is None or r.provider not in ("ours", "bitsandbytes") or (r.provider != "ours" and i):
                continue
            rows.append(dict(setting=list(setting) if r.provider == "ours" else None, provider=r.provider,
                             shape=r.shape, ms=round(r.ms, 4), bandwidth_fraction=r.bandwidth_fraction))  # fmt: skip
    mod._BLOCK, mod._NUM_WARPS, mod._PAIRS = default
    bnb = {r["shape"]: r["ms"] for r in rows if r["provider"] == "bitsandbytes"}
    for r in rows:
        if r["provider"] == "ours" and r["shape"] in bnb and "ms" in r:
            r["speedup_vs_bitsandbytes"] = round(bnb[r["shape"]] / r["ms"], 3)
    doc = {"bench": "nf4_sweep", "copy_gbps": round(h.copy_gbps, 1), "environment": environment(), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    for r in rows:
        if "ms" not in r:
            continue
        print(f"{r['shape']:<22} {r['provider']:<13} {r['setting']!s:<12} {r['ms']:8.4f} ms "
              f"bw {r['bandwidth_fraction']:.3f} vs bnb {r.get('speedup_vs_bitsandbytes')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
