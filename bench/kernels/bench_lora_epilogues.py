"""Session 15's LoRA-op changes, each against the form it replaced, at Llama-3.1-8B's 4x2048 shapes (the down
projection along K, timed here in session 16: 1.244 -> 1.225 ms, no gain in the step, reverted; bench/NOTES.md).

1. The adapters' gradient products: a bf16 GEMM and a cast to fp32 (before) against one GEMM writing fp32
   (``out_dtype``, now), for each product shape of a layer's backward.
2. The MLP's six fp32 adapters to bf16: a concatenation and cast of the A pair and four casts (before) against one
   multi-tensor copy (now).
3. An adapter's two backward products of one upstream gradient, ``M B`` and ``M^T (X A^T)``: two cuBLAS GEMMs (bf16
   and fp32 out) against `kernels.lora_pair` (one read of ``M``), at each tile setting of a small sweep.

Device time per form (bench/_harness.py: median of many repetitions, each after an L2 flush). Writes JSON to --out.
``--tiny``: a CPU smoke run at small shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _harness import Harness, environment  # noqa: E402

import raytune_llm.kernels.lora_pair as lp  # noqa: E402
from raytune_llm.kernels._dispatch import fp32_out_gemms  # noqa: E402
from raytune_llm.kernels.lora import _cast_adapters  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    h = Harness(tiny=args.tiny, reps=30, warmup=5)
    dev, bf = h.device, torch.bfloat16
    n, hid, inter, r = (64, 32, 96, 4) if args.tiny else (8192, 4096, 14336, 16)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    rows = []

    def pair(name, before, now):
        t0, t1 = h.time(lambda _: before()), h.time(lambda _: now())
        row = {"case": name, "before_ms": round(t0.ms, 4), "now_ms": round(t1.ms, 4)}
        row["saved_ms"] = round(t0.ms - t1.ms, 4)
        print(json.dumps(row), flush=True)
        rows.append(row)

    fp32_out = fp32_out_gemms(rnd(n, r))
    products = {  # (a, b) of a = [m, N]^T-style operand, b = [N, k]
        "dB q/o/down: dY^T (X A^T) [4096 x 16]": (rnd(n, hid).t(), rnd(n, r)),
        "dB gate/up: dG^T (X A_g^T) [14336 x 16]": (rnd(n, inter).t(), rnd(n, r)),
        "dA qkv: low^T X [48 x 4096]": (rnd(n, 3 * r).t(), rnd(n, hid)),
        "dA down: (dY B_d)^T H [16 x 14336]": (rnd(n, r).t(), rnd(n, inter)),
    }
    for name, (a, b) in products.items():
        now = (
            (lambda a=a, b=b: torch.mm(a, b, out_dtype=torch.float32))
            if fp32_out
            else (lambda a=a, b=b: (a @ b).float())
        )
        pair(name, lambda a=a, b=b: (a @ b).float(), now)
    f32 = torch.float32
    As = [rnd(r, hid, dtype=f32), rnd(r, hid, dtype=f32)]
    others = [rnd(inter, r, dtype=f32), rnd(inter, r, dtype=f32), rnd(r, inter, dtype=f32), rnd(hid, r, dtype=f32)]
    pair(
        "MLP adapters to bf16",
        lambda: (torch.cat(As).to(bf), [t.to(bf) for t in others]),
        lambda: _cast_adapters(As, others, bf),
    )
    tiles = (
        [(32, 32, 4, 1)]
        if args.tiny
        else [(32, 256, 4, 3), (64, 256, 8, 3), (32, 512, 8, 3), (64, 512, 8, 3), (128, 256, 8, 3)]
    )  # BN, BK, warps, num_stages (bench/kernels/sweep_lora_pair.py sweeps the stages too)
    for width in (96,) if args.tiny else (inter, hid, 1024):
        M, R, L = rnd(n, width), rnd(width, r), rnd(n, r)

        def cublas(M=M, R=R, L=L):
            return M @ R, (torch.mm(M.t(), L, out_dtype=torch.float32) if fp32_out else (M.t() @ L).float())

        for tile in tiles:
            lp._TILE = tile
            if args.tiny:
                lp._TILE_INTERPRET = tile
            pair(
                f"pair {n}x{width} r{r} tile {tile}",
                cublas,
                lambda M=M, R=R, L=L: lp.lora_pair(M, R, L, bf, torch.float32),
            )
        lp._TILE = tiles[0]
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
