"""Launch settings of the fused LoRA SwiGLU kernels (kernels/lora_swiglu.py) on the GPU.

At the 8B MLP of a 4x2048 step ([8192, 14336] bf16, rank 16) it times the forward kernel (reads G, U,
writes G, U, H) and the backward kernel (reads dH, G, U, writes H, dG, dU) under each BM:BN:warps setting,
median of CUDA-event timings, and gives each as a fraction of the copy bandwidth measured in the same run
(bytes moved / time / copy rate). Every setting's outputs are compared with the default's: bit-exact, and the
largest difference relative to the largest value (the rank-r tensor-core dot may sum in another order under
another tile); the best setting is picked among those within 1e-2.

    python bench/kernels/sweep_lora_swiglu.py --out $OUT/lora_swiglu_sweep.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from raytune_llm.kernels import lora_swiglu as mod

SETTINGS = "64:64:4,64:128:4,128:64:4,64:128:8,128:128:8,32:256:4,64:256:8,128:256:8,16:512:4,32:512:8"


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--settings", default=SETTINGS)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    n, i, r, dt = args.rows, args.inter, args.rank, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dt)

    G0, U0, dH0 = rand(n, i), rand(n, i), rand(n, i)
    xa_g, xa_u, Bg, Bu = rand(n, r), rand(n, r), rand(i, r, scale=0.1), rand(i, r, scale=0.1)
    low, Ad = rand(n, r), rand(r, i, scale=0.1)
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_ms = timed(lambda: big.clone(), args.reps)
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    G, U, dH = G0.clone(), U0.clone(), dH0.clone()
    tensor_bytes = n * i * 2

    def fwd():
        G.copy_(G0), U.copy_(U0)
        return mod.lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5)

    def bwd():
        G.copy_(G0), U.copy_(U0), dH.copy_(dH0)
        mod.lora_swiglu_backward(dH, G, U, low, Ad)

    reset_ms = {"fwd": timed(lambda: (G.copy_(G0), U.copy_(U0)), args.reps)}
    reset_ms["bwd"] = timed(lambda: (G.copy_(G0), U.copy_(U0), dH.copy_(dH0)), args.reps)
    moved = {"fwd": 5 * tensor_bytes, "bwd": 6 * tensor_bytes}
    ref = {"fwd": [t.clone() for t in (fwd(), G, U)]}
    bwd()
    ref["bwd"] = [t.clone() for t in (dH, G, U)]
    rows = []
    for text in args.settings.split(","):
        setting = tuple(int(x) for x in text.split(":"))
        for kind, fn in (("fwd", fwd), ("bwd", bwd)):
            saved = mod._FWD, mod._BWD
            if kind == "fwd":
                mod._FWD = setting
            else:
                mod._BWD = setting
            try:
                out = fn()
                got = [out, G, U] if kind == "fwd" else [dH, G, U]
                exact = all(torch.equal(a, b) for a, b in zip(got, ref[kind]))
                diff = max(
                    ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, ref[kind])
                )
                ms = timed(fn, args.reps) - reset_ms[kind]
                row = dict(setting=text, kernel=kind, ms=round(ms, 4), exact=exact, max_rel_diff=diff)
                row["bandwidth_fraction"] = round(moved[kind] / ms / 1e6 / copy_gbs, 3)
            except Exception as exc:  # noqa: BLE001 - a sweep: record the failing setting and go on
                row = dict(setting=text, kernel=kind, error=str(exc).splitlines()[0][:200])
            finally:
                mod._FWD, mod._BWD = saved
            print(json.dumps(row), flush=True)
            rows.append(row)
    doc = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": [n, i, r],
        "copy_gbs": round(copy_gbs, 1),
    }
    doc["default"] = {"fwd": list(mod._FWD), "bwd": list(mod._BWD)}
    doc["rows"] = rows
    args.out.write_text(json.dumps(doc, indent=1))
    for kind in ("fwd", "bwd"):
        ok = [x for x in rows if x["kernel"] == kind and x.get("max_rel_diff", 1.0) < 1e-2]
        best = min(ok, key=lambda x: x["ms"]) if ok else None
        print(f"{kind}: best {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
