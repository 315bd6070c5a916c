"""Launch settings of `kernels.lora_pair` (an adapter's two backward products from one read) at the step's shapes.

For each operand shape of a Llama-3.1-8B layer's backward (``dG``/``dU``/``H``: ``[N, 14336]``; ``dY`` of O, Q and down:
``[N, 4096]``; ``dY`` of K and V: ``[N, 1024]``; rank 16) and each ``BN:BK:warps:stages`` setting, the median
device time of ``lora_pair(M, R, L)`` (both products), against the two cuBLAS GEMMs it replaces, as a fraction of the
copy bandwidth measured in the same run (bytes: ``M`` once, the products and their fp32 partials). A setting's tile
decides how the fp32 partial sums are split, so its bits may differ from the default's: the largest difference
relative to the largest value is recorded (deterministic either way).

    python bench/kernels/sweep_lora_pair.py --rows 65536 --out $OUT/lora_pair_sweep.json
    TRITON_INTERPRET=1 python bench/kernels/sweep_lora_pair.py --tiny --out /tmp/lora_pair_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness  # noqa: E402

from raytune_llm.kernels import lora_pair as mod  # noqa: E402

SETTINGS = "32:256:4:3,32:256:4:2,32:256:4:4,64:256:8:3,16:256:4:3,32:128:4:3,64:128:4:3,32:512:8:3"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--cols", default="14336,4096,1024")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--settings", default=SETTINGS)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (TRITON_INTERPRET=1): 64 x 256, two settings")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.tiny:
        args.rows, args.cols, args.settings = 64, "256", "32:128:4:1,64:128:4:1"
    h = Harness(tiny=args.tiny, reps=args.reps)
    n, r, dt = args.rows, args.rank, h.dtype
    g = torch.Generator(device=h.device).manual_seed(0)
    rows = []
    for k in (int(c) for c in args.cols.split(",")):
        M = (torch.randn(n, k, device=h.device, generator=g)).to(dt)
        R = (torch.randn(k, r, device=h.device, generator=g) * 0.1).to(dt)
        L = (torch.randn(n, r, device=h.device, generator=g) * 0.1).to(dt)
        moved = M.numel() * M.element_size()

        def cublas(_, M=M, R=R, L=L):  # the harness passes what setup returned
            return M @ R, torch.mm(M.t(), L, out_dtype=torch.float32) if h.device == "cuda" else M.t() @ L

        ms = h.time(cublas, lambda: None).ms
        rows.append({"cols": k, "setting": "cublas", "ms": round(ms, 4),
                     "bandwidth_fraction": round(2 * moved / ms / 1e6 / h.copy_gbps, 3)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        ref = None
        for text in args.settings.split(","):
            setting = tuple(int(x) for x in text.split(":"))  # BN:BK:warps:stages
            saved = mod._TILE, mod._TILE_INTERPRET
            mod._TILE = setting
            if args.tiny:
                mod._TILE_INTERPRET = setting
            try:
                P, Q = mod.lora_pair(M, R, L, dt, torch.float32)
                ref = ref or (P, Q)
                diff = max(
                    ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip((P, Q), ref)
                )
                ms = h.time(lambda _, M=M, R=R, L=L: mod.lora_pair(M, R, L, dt, torch.float32), lambda: None).ms
                row = {"cols": k, "setting": text, "ms": round(ms, 4), "max_rel_diff": diff,
                       "bandwidth_fraction": round(moved / ms / 1e6 / h.copy_gbps, 3)}  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a sweep: record the failing setting and go on
                row = {"cols": k, "setting": text, "error": str(exc).splitlines()[0][:200]}
            finally:
                mod._TILE, mod._TILE_INTERPRET = saved
            print(json.dumps(row), flush=True)
            rows.append(row)
        del M, R, L
    doc = {"gpu": torch.cuda.get_device_name() if not args.tiny else "cpu", "torch": torch.__version__,
           "rows": n, "rank": r, "default": list(mod._TILE), "copy_gbs": round(h.copy_gbps, 1), "results": rows}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=1))
    for k in {x["cols"] for x in rows}:
        ok = [x for x in rows if x["cols"] == k and x["setting"] != "cublas" and "ms" in x]
        if ok:
            print(f"K={k}: best {min(ok, key=lambda x: x['ms'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
