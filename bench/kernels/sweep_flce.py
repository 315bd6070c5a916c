"""Fused linear CE on the GPU: chunk size, trained and frozen head, beside Liger-Kernel.

At Llama-3's head (32768 tokens x 4096 -> 128256, bf16), ours at each chunk size (trained head, or `frozen:C`) and
Liger's `liger_fused_linear_cross_entropy` run forward + backward with the harness's timing; the peak memory of one
run and the error of dL/dW and dL/dh against an fp32 computation (fp32 GEMMs without TF32, chunked) are recorded
beside the time. (Session 6 also tried an fp32 dL/dW accumulator and the gradient pass's order with this script:
bench/results/flce_sweep_h200_20261129_s6a.json, _s6b.json.)

    python bench/kernels/sweep_flce.py --out $OUT/flce_sweep.json
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

from raytune_llm.kernels import cross_entropy as mod  # noqa: E402

SETTINGS = "train:1024,train:2048,frozen:1024"


def _truth(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dh and dL/dW in fp32 (fp32 GEMMs, TF32 off), chunk by chunk; dL/dW is returned on the host."""
    torch.backends.cuda.matmul.allow_tf32 = False
    wf = w.detach().float()
    n = (y != -100).sum().float()
    dh = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    dw = torch.zeros(wf.shape, dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        hc = x[s : s + chunk].float()
        yc = y[s : s + chunk]
        g = torch.softmax(hc @ wf.t(), dim=-1)
        keep = yc != -100
        g[keep, yc[keep]] -= 1.0
        g[~keep] = 0.0
        g /= n
        dh[s : s + chunk] = g @ wf
        dw.addmm_(g.t(), hc)
        del g
    return dh, dw.cpu()


def _errors(got: torch.Tensor, want: torch.Tensor, rows: int = 8192) -> dict[str, float]:
    """max |got - want| / max |want| and rms(got - want) / rms(want), chunked over rows (want may be on the host)."""
    dmax = wmax = dsq = wsq = 0.0
    for s in range(0, got.shape[0], rows):
        g = got[s : s + rows].float()
        t = want[s : s + rows].to(g.device, non_blocking=True)
        d = g - t
        dmax, wmax = max(dmax, d.abs().max().item()), max(wmax, t.abs().max().item())
        dsq, wsq = dsq + d.double().pow(2).sum().item(), wsq + t.double().pow(2).sum().item()
    return {"max_rel": dmax / wmax, "rms_rel": (dsq / wsq) ** 0.5}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--settings", default=SETTINGS, help="head:chunk pairs (head train or frozen)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    h = Harness(reps=args.reps)
    n, hid, vocab = args.tokens, 4096, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)
    x_src = torch.randn(n, hid, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(vocab, hid, device="cuda", dtype=torch.bfloat16, generator=gen) / hid**0.5).requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    y[::7] = -100
    dh_true, dw_true = _truth(x_src, w, y)
    dh_true = dh_true.cpu()
    torch.cuda.empty_cache()

    def measure(label: str, fn, frozen: bool = False) -> dict:
        w.requires_grad_(not frozen)

        def setup():
            w.grad = None
            return x_src.clone().requires_grad_()

        def step(x):
            fn(x, w, y).backward()

        t = h.time(step, setup)
        x = setup()
        step(x)
        row = {"setting": label, "ms": round(t.ms, 3), "ms_p20": round(t.ms_p20, 3), "ms_p80": round(t.ms_p80, 3),
               "peak_mib": round(t.peak_mib, 1), "peak_extra_mib": round(t.peak_extra_mib, 1),
               "dw_error": None if frozen else _errors(w.grad, dw_true), "dh_error": _errors(x.grad, dh_true)}  # fmt: skip
        del x
        w.grad = None
        torch.cuda.empty_cache()
        dw = row["dw_error"] or {"max_rel": float("nan"), "rms_rel": float("nan")}
        print(f"{label:<16} {row['ms']:8.2f} ms  peak {row['peak_mib']:8.1f} MiB  dW max/rms rel "
              f"{dw['max_rel']:.2e}/{dw['rms_rel']:.2e}  dh "
              f"{row['dh_error']['max_rel']:.2e}/{row['dh_error']['rms_rel']:.2e}", flush=True)  # fmt: skip
        return row

    rows = []
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        liger = lambda a, b, c: liger_fused_linear_cross_entropy(a, b, c)  # noqa: E731
        rows.append(measure("liger", liger))
        rows.append(measure("liger frozen", liger, frozen=True))
    except ImportError:
        print("liger_kernel not installed: ours only")
    for setting in args.settings.split(","):
        head, chunk = setting.split(":")
        fn = lambda a, b, c, k=int(chunk): mod.fused_linear_cross_entropy(a, b, c, -100, k)  # noqa: E731
        rows.append(measure(setting, fn, frozen=head == "frozen"))
    rows.append(measure("ours default", mod.fused_linear_cross_entropy))
    rows.append(measure("ours default frozen", mod.fused_linear_cross_entropy, frozen=True))
    ref = {False: next((r for r in rows if r["setting"] == "liger"), None)}
    ref[True] = next((r for r in rows if r["setting"] == "liger frozen"), None)
    for r in rows:
        liger = ref["frozen" in r["setting"]]
        if liger and r is not liger:
            r["speedup_vs_liger"] = round(liger["ms"] / r["ms"], 4)
            r["peak_vs_liger"] = round(r["peak_mib"] / liger["peak_mib"], 4)
    doc = {"bench": "flce_trained_head_sweep", "shape": [n, hid, vocab], "environment": environment(), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
