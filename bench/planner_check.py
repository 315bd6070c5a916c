"""Predicted vs measured peak GPU memory: the sharding planner against real training steps.

For each checkpointing mode it builds a random-weight Llama-3.1-8B-shaped model with
`raytune_llm.models.synthetic.build_synthetic_model` (NF4 base, LoRA r=16 alpha=16 on all seven projections,
bf16, fused kernels unless --stack std), then for each micro_batch x seq_len case runs 1 warm-up and
`--steps` measured steps (forward with labels = inputs, backward, torch AdamW), with the peak taken as
`torch.cuda.max_memory_allocated` over the measured steps (the ANCHORS.md protocol). The prediction is
`plan_from_values(...).peak_gib` for the same values. Goal: |error| <= 15% on every case.

The JSON also holds a least-squares fit `peak = a + b * tokens` of the measurements per mode, beside the
planner's own intercept and slope, so the planner's constants can be refit from one run.

Writes bench/results/planner_<gpu>_<yyyymmdd>.json (and a copy into $OUT when set) and prints a table.

Usage::

    python bench/planner_check.py                       # GPU: 8B shapes, checkpointing on and offload
    python bench/planner_check.py --stack std --ckpt on # the standard transformers + PEFT stack
    python bench/planner_check.py --tiny                # CPU: tiny shapes, predictions only (no CUDA peak)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raytune_llm.sharding.planner import GIB, LLAMA31_8B, plan_from_values  # noqa: E402

GOAL = 0.15
LORA = {
    "r": 16,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# Real 8B config fields the model needs beyond what the planner reads (rope as in Llama 3.1).
MODEL_8B = {
    **LLAMA31_8B,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
MODEL_TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
CASES_GPU = "4x2048,1x2048,1x8192,1x16384,1x32768,1x65536"
CASES_TINY = "2x32,1x64,1x128"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def _environment(device: torch.device) -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "triton", "transformers", "peft", "bitsandbytes"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "gpu": gpu,
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _gpu_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100", "l40s", "a10g", "l4", "b200"):
        if key in name:
            return key
    return "".join(c for c in name.split()[-1] if c.isalnum()) or "gpu"


def _parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        try:
            b, s = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--cases: expected BxS items such as 1x2048, got {item!r}") from None
        cases.append((b, s))
    return cases


def _measure(model, optimizer, device, batch: int, seq: int, steps: int, vocab: int) -> dict:
    """Peak allocated bytes over `steps` full steps after one warm-up step, and the seconds per step."""
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up: AdamW states, kernel autotuning, allocator growth
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_bytes": peak, "s_per_step": seconds, "tokens_per_s": batch * seq / seconds, "losses": losses}


def _fit(points: list[tuple[int, float]]) -> dict | None:
    """Least squares peak_gib = a + b * tokens (b reported in KB per token)."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(p for _, p in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    b = sum((t - mx) * (p - my) for t, p in points) / sxx
    return {"intercept_gib": round(my - b * mx, 4), "kb_per_token": round(b * GIB / 1000, 3)}


def run_mode(args, hf_config: dict, ckpt: str, device: torch.device, gpu_gib: float) -> list[dict]:
    from raytune_llm.models.synthetic import build_synthetic_model

    fused = args.stack == "ours"
    t0 = time.perf_counter()
    model = build_synthetic_model(
        hf_config,
        quantize="nf4",
        lora=LORA,
        gradient_checkpointing=ckpt,
        dtype=args.dtype,
        device=device,
        seed=0,
        fused=fused,
    )
    build_s = time.perf_counter() - t0
    static = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    rows, oom = [], False
    for batch, seq in _parse_cases(args.cases):
        plan = plan_from_values(
            hf_config,
            quant_bits=4,
            lora_rank=LORA["r"],
            lora_targets=LORA["target_modules"],
            seq_len=seq,
            micro_batch=batch,
            checkpointing=ckpt,
            gpu_mem_gib=gpu_gib,
            fused=fused,
        )
        row = {
            "stack": args.stack,
            "checkpointing": ckpt,
            "micro_batch": batch,
            "seq_len": seq,
            "tokens": batch * seq,
            "predicted_gib": round(plan.peak_gib, 3),
            "predicted_bytes": plan.peak_bytes,
            "plan_strategy": plan.strategy,
            "predicted_breakdown_gib": {k: round(v / GIB, 3) for k, v in plan.breakdown.items()},
            "static_after_build_gib": None if static is None else round(static / GIB, 3),
            "build_s": round(build_s, 1),
        }
        if oom:
            row["status"] = "skipped after an OOM at a shorter case"
        else:
            try:
                m = _measure(model, optimizer, device, batch, seq, args.steps, hf_config["vocab_size"])
                row.update(
                    status="ok",
                    s_per_step=round(m["s_per_step"], 3),
                    tokens_per_s=round(m["tokens_per_s"], 1),
                    losses=m["losses"],
                )
                if m["peak_bytes"] is not None:
                    measured = m["peak_bytes"] / GIB
                    row["measured_gib"] = round(measured, 3)
                    row["measured_bytes"] = m["peak_bytes"]
                    row["error"] = round(plan.peak_gib / measured - 1, 4)
                    row["within_goal"] = abs(row["error"]) <= GOAL
            except torch.cuda.OutOfMemoryError:
                oom = True
                row["status"] = "oom"
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        rows.append(row)
        print(_row_text(row), flush=True)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _row_text(r: dict) -> str:
    meas = f"{r['measured_gib']:.2f}" if r.get("measured_gib") is not None else "-"
    err = f"{100 * r['error']:+.1f}%" if r.get("error") is not None else "-"
    return (
        f"{r['stack']:<6}{r['checkpointing']:<9}{r['micro_batch']:>3}x{r['seq_len']:<7}"
        f"{r['predicted_gib']:>10.2f}{meas:>10}{err:>9}  {r['status']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU proof run on tiny shapes (predictions only)")
    p.add_argument("--stack", choices=["ours", "std"], default="ours", help="fused model or transformers + PEFT")
    p.add_argument("--ckpt", default="on,offload", help="comma list of checkpointing modes (on, offload, off)")
    p.add_argument("--cases", default=None, help=f"comma list of BxS (default GPU {CASES_GPU}; tiny {CASES_TINY})")
    p.add_argument("--steps", type=int, default=2, help="measured steps per case (after one warm-up)")
    p.add_argument("--out", default=None, help="output JSON (default bench/results/planner_<gpu>_<date>.json)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny on the CPU")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    hf_config = MODEL_TINY if args.tiny else MODEL_8B
    args.cases = args.cases or (CASES_TINY if args.tiny else CASES_GPU)
    # bf16 on the GPU as in the anchors; fp32 on the CPU, whose lane has no fast bf16 kernels.
    args.dtype = torch.bfloat16 if cuda else torch.float32
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB if cuda else 80.0

    print(f"{'stack':<6}{'ckpt':<9}{'BxS':>11}{'pred GiB':>10}{'meas GiB':>10}{'error':>9}  status")
    rows = []
    for ckpt in args.ckpt.split(","):
        rows += run_mode(args, hf_config, ckpt.strip(), device, gpu_gib)

    fits = {}
    for ckpt in args.ckpt.split(","):
        ours = [r for r in rows if r["checkpointing"] == ckpt]
        pts = [(r["tokens"], r["measured_bytes"] / GIB) for r in ours if "measured_bytes" in r]
        pred = [(r["tokens"], r["predicted_bytes"] / GIB) for r in ours]
        fits[ckpt] = {"measured": _fit(pts), "predicted": _fit(pred)}
    measured = [r for r in rows if "error" in r]
    summary = {
        "goal": f"|predicted / measured - 1| <= {GOAL:.0%}",
        "cases_measured": len(measured),
        "cases_within_goal": sum(r["within_goal"] for r in measured),
        "worst_error": max((abs(r["error"]) for r in measured), default=None),
    }
    result = {
        "bench": "planner_check",
        "tiny": args.tiny,
        "model": hf_config,
        "lora": LORA,
        "gpu_mem_gib": round(gpu_gib, 2),
        "environment": _environment(device),
        "summary": summary,
        "fits": fits,
        "rows": rows,
    }
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    default_name = f"planner_{_gpu_slug(device)}{'_tiny' if args.tiny else ''}_{day}.json"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        shutil.copy(out, Path(os.environ["OUT"]) / out.name)
    print(json.dumps(summary))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
