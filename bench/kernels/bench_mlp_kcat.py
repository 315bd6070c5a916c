"""The fused LoRA MLP with gate and up finished inside their GEMMs (K-extended operands) against the rank-r epilogue.

`kernels.lora._KCAT` picks how gate and up get their rank-r updates: True, one GEMM each over ``[X | X A^T]`` and
``[W | s B | 0]`` (K = hidden + r_g + r_u), so the activation kernels are plain streaming passes; False, the base GEMMs
and then the Triton kernels add ``s (X A^T) B^T`` with a tensor-core dot per tile. This times one Llama-3.1-8B MLP
(NF4 bases, rank 16) the four ways a step runs it, each way in both settings, median of CUDA-event timings:

- ``grad``: a forward with grad and its backward (the layers that are not checkpointed);
- ``ckpt``: a checkpointed layer's forward (no grad, H alone), then its lean recompute and backward;
- ``kept``: the forward keeping G, U and H A_d^T (`keep_mlp_outputs`), then the recompute that reuses them and backward;
- ``act``: the activation kernel alone on finished G and U at each ``--act-settings`` tile (BM:BN:warps).

It checks that both settings give gradients within bf16 rounding of each other and that, in each setting, the
checkpointed and kept paths give the grad path's bits; then it states what a step of the 64k conf
(2 grad, ``--kept`` kept and the rest checkpointed layers of 32) would gain.

    python bench/kernels/bench_mlp_kcat.py --rows 65536 --out $OUT/mlp_kcat.json
    TRITON_INTERPRET=1 python bench/kernels/bench_mlp_kcat.py --tiny --out /tmp/mlp_kcat.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from raytune_llm.kernels import lora as lora_mod  # noqa: E402
from raytune_llm.kernels import lora_swiglu  # noqa: E402
from raytune_llm.kernels.lora import LoRAWeight, dequantize_once, keep_mlp_outputs, lean_recompute  # noqa: E402
from raytune_llm.kernels.lora import lora_mlp, reuse_mlp_outputs  # noqa: E402
from raytune_llm.kernels.nf4 import NF4Weight  # noqa: E402


def _timer(cuda: bool):
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        return (lambda: a.record()), (lambda: (b.record(), torch.cuda.synchronize(), a.elapsed_time(b))[2])
    box = {}
    return (lambda: box.__setitem__("t", time.perf_counter())), (lambda: (time.perf_counter() - box["t"]) * 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--kept", type=int, default=16, help="kept layers of the 64k conf (2 on the GPU + 14 on the host)")
    p.add_argument("--act-settings", default="16:128:4,16:256:4,32:128:4,8:256:2,16:512:8,32:256:8")
    p.add_argument("--tiny", action="store_true", help="CPU run under TRITON_INTERPRET=1: 64 rows, hidden 32")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    dev = "cuda" if cuda else "cpu"
    n, hid, inter, r = (64, 32, 64, 16) if args.tiny else (args.rows, 4096, 14336, 16)
    reps = 1 if args.tiny else args.reps
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

    def nf4(out_f, in_f):
        import bitsandbytes.functional as bnbF

        w = rand(out_f, in_f, scale=0.02)
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        return NF4Weight.from_bnb(packed, qs)

    shapes = {"gate": (inter, hid), "up": (inter, hid), "down": (hid, inter)}
    layers = {}
    for name, (o, i) in shapes.items():
        A = rand(r, i, scale=0.02, dtype=torch.float32).requires_grad_()
        B = rand(o, r, scale=0.02, dtype=torch.float32).requires_grad_()
        layers[name] = LoRAWeight(nf4(o, i), A, B, 2.0)
    ws = (layers["gate"], layers["up"], layers["down"])
    params = [t for w in ws for t in (w.A, w.B)]
    x0, dy = rand(n, hid), rand(n, hid, scale=0.01)
    start, stop = _timer(cuda)

    def run(way: str) -> tuple[float, float, list[torch.Tensor]]:
        for t in params:
            t.grad = None
        x = x0.clone().requires_grad_()
        if way == "grad":
            start()
            y = lora_mlp(x, *ws)
            f = stop()
            start()
            y.backward(dy)
            b = stop()
        else:
            store: list = []
            start()
            with torch.no_grad(), keep_mlp_outputs(store if way == "kept" else None):
                lora_mlp(x, *ws)
            f = stop()
            start()
            with dequantize_once():
                with lean_recompute(), reuse_mlp_outputs(store):
                    y = lora_mlp(x, *ws)
                y.backward(dy)
            b = stop()
        return f, b, [x.grad] + [t.grad for t in params]

    rows, grads = [], {}
    for kcat in (False, True):
        lora_mod._KCAT[0] = kcat
        for way in ("grad", "ckpt", "kept"):
            run(way)  # compile, warm the allocator
            fs, bs = [], []
            for _ in range(reps):
                f, b, gr = run(way)
                fs.append(f)
                bs.append(b)
            grads[(kcat, way)] = gr
            fm, bm = statistics.median(fs), statistics.median(bs)
            rows.append({"kcat": kcat, "way": way, "fwd_ms": round(fm, 4), "bwd_ms": round(bm, 4),
                         "total_ms": round(fm + bm, 4)})  # fmt: skip
            print(f"kcat={kcat!s:5} {way:5} fwd {fm:8.3f} ms  recompute+bwd {bm:8.3f} ms", flush=True)
    lora_mod._KCAT[0] = True

    checks = {}
    for kcat in (False, True):
        for way in ("ckpt", "kept"):
            checks[f"{way}_bits_equal_grad_kcat{int(kcat)}"] = all(
                torch.equal(a, b) for a, b in zip(grads[(kcat, way)], grads[(kcat, "grad")])
            )
    rel = [((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
           for a, b in zip(grads[(True, "grad")], grads[(False, "grad")])]  # fmt: skip
    checks["max_rel_diff_kcat_vs_epilogue"] = max(rel)
    print("checks:", checks)

    # The activation kernel alone on finished G and U, at each tile.
    act = []
    if cuda:
        G, U = rand(n, inter), rand(n, inter)
        keep = lora_swiglu._FWD_ACT
        copy_src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=dev)
        copy_dst = torch.empty_like(copy_src)
        ts = []
        for _ in range(5):
            start()
            copy_dst.copy_(copy_src)
            ts.append(stop())
        copy_gbs = 2 * 2**30 / statistics.median(ts) / 1e6
        ref = None
        for s in args.act_settings.split(","):
            bm, bn, warps = (int(v) for v in s.split(":"))
            lora_swiglu._FWD_ACT = (bm, bn, warps, 32768)
            Hs, ts = None, []
            for _ in range(reps + 1):
                start()
                Hs = lora_swiglu.lora_swiglu_forward(G, U, G[:, :r], U[:, :r], G[:r].t(), U[:r].t(), 1.0, 1.0,
                                                     finished=True)  # fmt: skip
                ts.append(stop())
            ms = statistics.median(ts[1:])
            ref = Hs if ref is None else ref
            act.append({"setting": s, "ms": round(ms, 4), "exact": bool(torch.equal(Hs, ref)),
                        "bandwidth_fraction": round(3 * n * inter * 2 / ms / 1e6 / copy_gbs, 3)})  # fmt: skip
            print(f"act {s:10} {ms:7.3f} ms  {act[-1]['bandwidth_fraction']:.3f} of copy ({copy_gbs:.0f} GB/s)")
        lora_swiglu._FWD_ACT = keep

    by = {(row["kcat"], row["way"]): row["total_ms"] for row in rows}
    lean_layers = 32 - 2 - args.kept
    step = {k: 2 * by[(k, "grad")] + args.kept * by[(k, "kept")] + lean_layers * by[(k, "ckpt")] for k in (False, True)}
    print(f"per step (2 grad + {args.kept} kept + {lean_layers} checkpointed MLPs): epilogue {step[False]:.1f} ms, "
          f"K-extended {step[True]:.1f} ms, {step[True] - step[False]:+.1f} ms")  # fmt: skip
    out = {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "shape": [n, hid, inter, r],
        "rows": rows,
        "act": act,
        "checks": checks,
        "step_mlp_ms": {"epilogue": round(step[False], 2), "kcat": round(step[True], 2)},
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
