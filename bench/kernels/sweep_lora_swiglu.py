"""Launch settings of the fused LoRA SwiGLU kernels (kernels/lora_swiglu.py) on the GPU.

At the 8B MLP of a 4x2048 step ([8192, 14336] bf16, rank 16) it times the forward kernel (reads G, U,
writes G, U, H), the backward kernel (reads dH, G, U, writes H, dG, dU) and the backward kernel of a lean
recompute (the same, finishing gate and up with their rank updates first) under each BM:BN:warps:stages:spans setting,
median of the harness's CUDA-event timings (bench/_harness.py), and gives each as a fraction of the copy bandwidth measured in the same run
(bytes moved / time / copy rate). Every setting's outputs are compared with the default's: bit-exact, and the
largest difference relative to the largest value (the rank-r tensor-core dot may sum in another order under
another tile); the best setting is picked among those within 1e-2.

    python bench/kernels/sweep_lora_swiglu.py --out $OUT/lora_swiglu_sweep.json
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

from raytune_llm.kernels import lora_swiglu as mod  # noqa: E402

# BM:BN:warps:stages:spans (session 23 call 3, bench/results/lora_swiglu_sweep_s23c_*.json: 16:128:4:3:32 fastest for
# all four kernels at 65,536, 16,384 and 8,192 rows; 16:128:4:1:4096 is one 16-row step a program)
SETTINGS = ("16:128:4:1:4096,16:128:4:2:16,16:128:4:3:16,16:128:4:3:8,16:128:4:2:8,16:128:4:3:32,16:128:4:4:16,"
            "8:128:2:2:16,16:64:2:3:16,32:128:4:3:16")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--settings", default=SETTINGS)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (TRITON_INTERPRET=1): 64 x 256, two settings")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.tiny:
        args.rows, args.inter, args.settings = 64, 256, "16:128:4:1:4,16:128:4:2:2"
    h = Harness(tiny=args.tiny, reps=args.reps)  # L2 flushed and the launch queue pre-rolled before each rep
    n, i, r, dt = args.rows, args.inter, args.rank, h.dtype
    g = torch.Generator(device=h.device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=h.device, generator=g) * scale).to(dt)

    G0, U0, dH0 = rand(n, i), rand(n, i), rand(n, i)
    xa_g, xa_u, Bg, Bu = rand(n, r), rand(n, r), rand(i, r, scale=0.1), rand(i, r, scale=0.1)
    low, Ad = rand(n, r), rand(r, i, scale=0.1)
    G, U, dH = G0.clone(), U0.clone(), dH0.clone()

    def reset(*pairs):  # the kernels work in place: fresh inputs before each (untimed) repetition
        return lambda: [dst.copy_(src) for dst, src in pairs] and None

    kinds = {
        "fwd": (lambda _: mod.lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5), reset((G, G0), (U, U0))),
        # a checkpointed layer's forward: H alone, the finished gate and up not written back
        "fwd_h_only": (
            lambda _: mod.lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5, store_gu=False),
            reset((G, G0), (U, U0)),
        ),
        "bwd": (lambda _: mod.lora_swiglu_backward(dH, G, U, low, Ad), reset((G, G0), (U, U0), (dH, dH0))),
        # a lean recompute's backward: it finishes gate and up with their rank updates itself
        "bwd_finish": (
            lambda _: mod.lora_swiglu_backward(dH, G, U, low, Ad, finish=(xa_g, xa_u, Bg, Bu, 2.0, 0.5)),
            reset((G, G0), (U, U0), (dH, dH0)),
        ),
    }
    moved = {k: {"fwd": 5, "fwd_h_only": 3}.get(k, 6) * n * i * G.element_size() for k in kinds}

    def outputs(kind):
        fn, setup = kinds[kind]
        setup()
        out = fn(None)
        return [t.clone() for t in ((out, G, U) if kind.startswith("fwd") else (dH, G, U))]

    ref = {kind: outputs(kind) for kind in kinds}
    rows = []
    for text in args.settings.split(","):
        setting = tuple(int(x) for x in text.split(":"))  # BM:BN:warps:stages:spans
        for kind, (fn, setup) in kinds.items():
            saved = mod._LAUNCH, mod._TILE_INTERPRET, mod._SPANS_INTERPRET
            mod._LAUNCH = setting
            if args.tiny:  # the interpreter takes its own tile: give it this one's
                mod._TILE_INTERPRET, mod._SPANS_INTERPRET = setting[:2], setting[4]
            try:
                got = outputs(kind)
                exact = all(torch.equal(a, b) for a, b in zip(got, ref[kind]))
                diff = max(
                    ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, ref[kind])
                )
                ms = h.time(fn, setup).ms
                row = dict(setting=text, kernel=kind, ms=round(ms, 4), exact=exact, max_rel_diff=diff)
                row["bandwidth_fraction"] = round(moved[kind] / ms / 1e6 / h.copy_gbps, 3)
            except Exception as exc:  # noqa: BLE001 - a sweep: record the failing setting and go on
                row = dict(setting=text, kernel=kind, error=str(exc).splitlines()[0][:200])
            finally:
                mod._LAUNCH, mod._TILE_INTERPRET, mod._SPANS_INTERPRET = saved
            print(json.dumps(row), flush=True)
            rows.append(row)
    doc = {"gpu": torch.cuda.get_device_name() if not args.tiny else "cpu", "torch": torch.__version__}
    doc.update(
        shape=[n, i, r],
        copy_gbs=round(h.copy_gbps, 1),
        default=list(mod._LAUNCH),
    )
    doc["rows"] = rows
    args.out.write_text(json.dumps(doc, indent=1))
    for kind in kinds:
        ok = [x for x in rows if x["kernel"] == kind and x.get("max_rel_diff", 1.0) < 1e-2]
        best = min(ok, key=lambda x: x["ms"]) if ok else None
        print(f"{kind}: best {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
