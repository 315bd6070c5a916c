"""The fused LoRA SwiGLU kernels (`kernels.lora_swiglu_grad`) against what they replace, on the GPU.

At Llama-3.1-8B's MLP ([rows, 14336] bf16, rank 16) it times, per case, the unfused form (``_FUSED`` off) and the
fused one under each ``BN:warps`` setting (``BK`` is lora_pair's), median of the harness's CUDA-event timings
(bench/_harness.py, L2 flushed before each repetition). Backward cases: a lean recompute (gate and up finished in
the kernel, ``H A_d^T`` formed) and a finished layer; unfused, `lora_swiglu_backward` and three `lora_pair` calls.
Forward cases: ``H`` alone (a checkpointed layer's forward) and ``G``, ``U``, ``H`` (a kept layer's), with ``H A_d^T``;
unfused, `lora_swiglu_forward` and a `lora_pair` call. Every output is compared with the unfused one: bit-exact
(``dG``, ``dU``, ``H`` and the ``[N, r]`` products must be; the ``[I, r]`` ones are at lora_pair's ``BN``) and the
largest difference relative to the largest value. Peak memory: the fused kernels hold their fp32 partial buffers
at once.

    python bench/kernels/bench_lora_swiglu_grad.py --rows 65536 --out $OUT/lora_swiglu_grad.json
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

from raytune_llm.kernels import lora_swiglu_grad as mod  # noqa: E402

SETTINGS = "16:8,32:8,16:4,32:16"  # BN:warps[:num_stages[:log2 split of lora_pair's row span]]
NAMES = ["dG", "dU", "H A_d^T", "H^T dYB", "dG B_g", "dG^T xa_g", "dU B_u", "dU^T xa_u"]
FWD_NAMES = ["G", "U", "H", "H A_d^T"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[8192])
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--settings", default=SETTINGS)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (TRITON_INTERPRET=1): 70 x 300, one setting")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.tiny:
        args.rows, args.inter, args.settings = [70], 300, "64:4"
    h = Harness(tiny=args.tiny, dtype=torch.bfloat16, reps=args.reps)  # the fused path is bf16/fp16 only
    rows_out = []
    for n in args.rows:
        rows_out += _run_rows(h, n, args.inter, args.rank, args.settings)
    doc = {"environment": environment(), "shape_inter_rank": [args.inter, args.rank], "copy_gbs": h.copy_gbps}
    doc.update(default_tile=list(mod._TILE), rows=rows_out)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"{'rows':>6} {'case':<9} {'variant':<12} {'ms':>8} {'peak MiB':>9}  exact")
    for r in rows_out:
        print(f"{r['rows']:>6} {r['case']:<9} {r['variant']:<12} {r.get('ms', float('nan')):>8.3f} "
              f"{r.get('peak_mib', 0):>9.0f}  {r.get('exact', r.get('error', ''))}")  # fmt: skip
    return 0


def _run_rows(h: Harness, n: int, inter: int, r: int, settings: str) -> list[dict]:
    g = torch.Generator(device=h.device).manual_seed(n)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=h.device, generator=g) * scale).to(h.dtype)

    src = dict(dH=rand(n, inter), G=rand(n, inter), U=rand(n, inter), dYB=rand(n, r, scale=0.1))
    src.update(
        Ad=rand(r, inter, scale=0.1), XA=rand(n, 2 * r), Bg=rand(inter, r, scale=0.1), Bu=rand(inter, r, scale=0.1)
    )
    work = {k: v.clone() for k, v in src.items() if k in ("dH", "G", "U")}

    def reset():  # the kernels work in place: fresh inputs before each (untimed) repetition
        for k, t in work.items():
            t.copy_(src[k])

    def call(case):
        if case.startswith("fwd"):  # H and H A_d^T, and G and U written back (a kept layer's forward) or not
            H, HA = mod.swiglu_forward_products(
                work["G"], work["U"], src["XA"][:, :r], src["XA"][:, r:], src["Bg"], src["Bu"], src["Ad"], 1.0, 1.0,
                case == "fwd_gu",
            )  # fmt: skip
            return H, HA, None, None, None, None
        return mod.swiglu_backward_products(
            work["dH"], work["G"], work["U"], src["dYB"], src["Ad"], src["XA"], [r, r], src["Bg"], src["Bu"],
            (1.0, 1.0), case == "lean", False, [True] * 6, [torch.float32] * 6,
        )  # fmt: skip

    out = []
    for case in ("lean", "finished", "fwd_h", "fwd_gu"):
        mod._FUSED[0] = False
        reset()
        ref = [t.clone() if t is not None else None for t in (work["G"], work["U"], *call(case))]
        variants = [("unfused", None)] + [
            (f"fused {s}", tuple(int(x) for x in s.split(":"))) for s in settings.split(",")
        ]
        for name, tile in variants:
            saved, switch = mod._TILE, mod._FUSED[0]
            mod._FUSED[0] = tile is not None
            mod._TILE = tile or saved
            row = dict(rows=n, case=case, variant=name)
            try:
                reset()
                got = [t.clone() if t is not None else None for t in (work["G"], work["U"], *call(case))]
                names = FWD_NAMES if case.startswith("fwd") else NAMES
                row["exact"] = {k: bool(torch.equal(a, b)) for k, a, b in zip(names, got, ref) if a is not None}
                row["max_rel_diff"] = max(
                    ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                    for a, b in zip(got, ref)
                    if a is not None
                )
                timing = h.time(lambda _, case=case: call(case), reset)
                row["ms"] = round(timing.ms, 4)
                if not h.tiny:
                    reset()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    call(case)
                    row["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            except Exception as exc:  # noqa: BLE001 - a sweep: record the failing setting and go on
                row["error"] = str(exc).splitlines()[0][:200]
            finally:
                mod._TILE = saved
                mod._FUSED[0] = switch
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
