"""Multi-GPU runs through the real CLI: Ray Train data-parallel scaling and ZeRO-3 QLoRA of 70B across GPUs.

Every run is `python -m raytune_llm train conf/...yaml ...` in its own process, as a user runs it, with
`model.random_weights=true`: the model folder holds only config.json and a tokenizer (Llama-3.1-8B / -70B shapes,
bench/e2e/_common.py), each worker draws the same seeded weights on its GPU and quantizes them as they are drawn, so
no checkpoint is written or read. Data: a JSONL of plain-text documents of 100-2000 words (every token trained),
packed into rows of `seq_len`.

Parts (`--parts`, comma separated):
    dp      conf/llama3_8b_qlora.yaml (fused kernels, offloaded checkpoints, attention stash, dequantize once),
            micro-batch 4 x 2048 per GPU, on 1 GPU, then on all of them (`--gpus`). tokens/s is the mean of the
            logged windows after the first (the first holds the Triton compiles); scaling efficiency =
            tokens/s on N / (N x tokens/s on 1).
    zero3   conf/llama3_70b_qlora_zero3.yaml: ZeRO-3, NF4 stored in bf16 words, sequence 2048, micro-batch 1, on
            `--gpus` GPUs; the per-GPU peak is the largest rank's `max_memory_allocated` after the load (the
            trainer's `gpu_peak_gib`), beside `raytune-llm plan`'s prediction for the same config.

Writes `multigpu_<gpu>_<yyyymmdd>[_tag].json` under --out (and $OUT) with a top-level "summary"
(`scaling_efficiency_<N>gpu`, `zero3_70b_peak_gib_per_gpu`, `zero3_70b_tokens_per_s`) and prints a table.

    python bench/multigpu/bench_multigpu.py --parts dp,zero3 --gpus 2     # GPU machine
    python bench/multigpu/bench_multigpu.py --tiny                        # CPU: tiny shapes, 2 CPU workers
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "e2e"))

from _common import (  # noqa: E402
    LLAMA31_8B,
    LLAMA31_70B,
    TINY,
    TINY_70B,
    environment,
    gpu_slug,
    log,
    utc_day,
    version,
    write_json,
)
from make_model import write_config, write_tokenizer  # noqa: E402


def model_folder(root: Path, name: str, cfg: dict) -> Path:
    """config.json and a tokenizer of `cfg`'s shapes, nothing else (the run draws the weights)."""
    folder = root / name
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_config(cfg, folder)
        write_tokenizer(cfg, folder)
    return folder


def text_data(path: Path, n_tokens: int, vocab: int, seed: int = 0) -> Path:
    """JSONL of {"text": ...} documents of 100-2000 random words t0..t{vocab-1}, about `n_tokens` words in all."""
    rng = random.Random(seed)
    with path.open("w") as f:
        total = 0
        while total < n_tokens:
            n = rng.randint(100, 2000)
            f.write(json.dumps({"text": " ".join(f"t{rng.randrange(vocab)}" for _ in range(n))}) + "\n")
            total += n
    return path


def train(conf: str, name: str, overrides: list[str], out: Path, timeout: int) -> dict:
    """One `raytune-llm train` process; its metrics, wall time, exit code and output tail."""
    cmd = [sys.executable, "-m", "raytune_llm", "train", conf, f"output_dir={out}", f"name={name}", *overrides]
    log(f"run {name}: {' '.join(cmd[3:])}")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    wall = time.perf_counter() - t0
    lines = [x for x in text.splitlines() if x.strip() and "Failed to query" not in x]
    metrics_file = out / name / "metrics.jsonl"
    metrics = [json.loads(x) for x in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    windows = [m for m in metrics if "tokens_per_s" in m]
    timed = windows[1:] or windows  # the first window holds the compiles
    result = {
        "rc": rc,
        "wall_s": round(wall, 1),
        "overrides": overrides,
        "steps": len(metrics),
        "windows": [{k: m[k] for k in ("step", "tokens_per_s", "gpu_peak_gib", "loss") if k in m} for m in windows],
        "tokens_per_s": round(sum(m["tokens_per_s"] for m in timed) / len(timed), 1) if timed else None,
        "peak_gib_per_gpu": max((m["gpu_peak_gib"] for m in windows if "gpu_peak_gib" in m), default=None),
        "losses": [round(m["loss"], 4) for m in metrics],
        "log": [x for x in lines if "[raytune-llm]" in x and "] step " not in x][:30],
        "tail": lines[-25:],
    }
    log(
        f"{name}: rc {rc}, {wall:.0f} s, {len(metrics)} steps, tokens/s {result['tokens_per_s']}, "
        f"peak {result['peak_gib_per_gpu']} GiB"
    )
    if rc != 0:
        print("\n".join(lines[-25:]), flush=True)
    return result


def predicted_peak_gib(conf: str, overrides: list[str], gpus: int) -> float:
    """`raytune-llm plan`'s per-GPU figure for the configured strategy (the config's own model folder)."""
    from raytune_llm.config import load_config
    from raytune_llm.train.sharded import plan_for

    cfg = load_config(REPO / conf, overrides)
    hf = json.loads((Path(cfg.model.path) / "config.json").read_text())
    plan = plan_for(cfg, hf, gpus_per_node=gpus)
    key = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}[cfg.sharding.strategy]
    return round(plan.alternatives[key] / 2**30, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="dp,zero3")
    ap.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU runs (default 2)")
    ap.add_argument("--tiny", action="store_true", help="CPU: tiny shapes, 2 CPU workers, DeepSpeed on gloo")
    ap.add_argument("--dp-steps", type=int, default=20)
    ap.add_argument("--zero3-steps", type=int, default=6)
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run")
    ap.add_argument("--work", default="/tmp/raytune_multigpu")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    os.environ.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", RAYTUNE_LLM_PROGRESS="0")
    if args.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    env = environment()  # no torch here: the driver makes no CUDA context on a GPU the workers use
    env.update({d: version(d) for d in ("ray", "deepspeed")})
    try:
        gpus = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()
        )
    except FileNotFoundError:
        gpus = []
    env["gpu"], env["gpus_on_machine"] = (gpus[0].split(",")[0].strip(), gpus) if gpus else ("cpu", [])
    if not args.tiny and env["gpu"] == "cpu":
        print("no CUDA GPU: run with --tiny on CPU", file=sys.stderr)
        return 2
    small, big = (TINY, TINY_70B) if args.tiny else (LLAMA31_8B, LLAMA31_70B)
    seq, mb = (128, 2) if args.tiny else (2048, 4)
    device = ["train.use_gpu=no", "model.dtype=fp32", "train.cpus_per_worker=0.5"] if args.tiny else [
        "train.use_gpu=yes", "train.cpus_per_worker=4"
    ]  # fmt: skip
    common = [
        "model.random_weights=true", "export.formats=[]", "data.format=text", "train.grad_accum=1",
        "train.checkpoint_every=0", "train.warmup_steps=2", "train.max_failures=0", *device,
    ]  # fmt: skip
    result: dict = {"summary": {}, "tiny": args.tiny, "gpus": args.gpus, "parts": {}, "environment": env}
    stamp = f"_{args.tag}" if args.tag else ""
    path = Path(args.out) / f"multigpu_{gpu_slug(env['gpu'])}_{utc_day()}{'_tiny' if args.tiny else ''}{stamp}.json"

    def save() -> None:
        write_json(path, result)

    if "dp" in parts:
        folder = model_folder(work, "llama8b" if not args.tiny else "tiny8b", small)
        rows = args.dp_steps * mb * args.gpus
        data = text_data(work / "dp.jsonl", int(rows * seq * 1.15), small["vocab_size"] - 256)
        base = [
            f"model.path={folder}", f"data.path={data}", f"data.seq_len={seq}", f"train.micro_batch_size={mb}",
            f"train.max_steps={args.dp_steps}", f"train.log_every={max(1, args.dp_steps // 4)}", *common,
        ]  # fmt: skip
        if args.tiny:  # the CPU lane has no pinned memory for offloaded checkpoints or the attention stash
            base += ["model.gradient_checkpointing=on", "model.stash_attention=false", "model.dequantize_once=false"]
        dp = result["parts"]["dp"] = {}
        for n in sorted({1, args.gpus}):
            dp[f"{n}gpu"] = train(
                "conf/llama3_8b_qlora.yaml", f"dp{n}", [*base, f"train.num_workers={n}"], runs, args.timeout
            )
            save()
        one, many = dp["1gpu"]["tokens_per_s"], dp[f"{args.gpus}gpu"]["tokens_per_s"]
        if args.gpus > 1 and one and many:
            result["summary"][f"scaling_efficiency_{args.gpus}gpu"] = round(many / (args.gpus * one), 3)
            result["summary"]["dp_tokens_per_s"] = {"1": one, str(args.gpus): many}
        save()
    if "zero3" in parts:
        folder = model_folder(work, "llama70b" if not args.tiny else "tiny70b", big)
        rows = args.zero3_steps * args.gpus
        data = text_data(work / "zero3.jsonl", int(rows * seq * 1.15), big["vocab_size"] - 256, seed=1)
        over = [
            f"model.path={folder}", f"data.path={data}", f"data.seq_len={seq}", "train.micro_batch_size=1",
            f"train.num_workers={args.gpus}", f"train.max_steps={args.zero3_steps}",
            f"train.log_every={max(1, args.zero3_steps // 3)}", *common,
        ]  # fmt: skip
        if args.tiny:
            over += ["quant.storage_dtype=fp32"]
        z = result["parts"]["zero3"] = train("conf/llama3_70b_qlora_zero3.yaml", "zero3", over, runs, args.timeout)
        z["planner_peak_gib_per_gpu"] = predicted_peak_gib("conf/llama3_70b_qlora_zero3.yaml", over, args.gpus)
        if z["rc"] == 0:
            result["summary"]["zero3_70b_peak_gib_per_gpu"] = z["peak_gib_per_gpu"]
            result["summary"]["zero3_70b_tokens_per_s"] = z["tokens_per_s"]
            result["summary"]["zero3_70b_planner_peak_gib_per_gpu"] = z["planner_peak_gib_per_gpu"]
        save()

    print(f"\n{'run':<10}{'rc':>4}{'wall s':>8}{'tokens/s':>11}{'per GPU':>10}{'peak GiB/GPU':>14}{'planner':>9}")
    for key, r in [
        *((f"dp {k}", v) for k, v in result["parts"].get("dp", {}).items()),
        ("zero3", result["parts"].get("zero3")),
    ]:
        if not r:
            continue
        n = int(key.split()[1][:-3]) if key.startswith("dp") else args.gpus
        tps = r["tokens_per_s"]
        per = f"{tps / n:,.0f}" if tps else "-"
        print(
            f"{key:<10}{r['rc']:>4}{r['wall_s']:>8.0f}{(f'{tps:,.0f}' if tps else '-'):>11}{per:>10}"
            f"{(r['peak_gib_per_gpu'] or 0):>14.2f}{r.get('planner_peak_gib_per_gpu', '-')!s:>9}"
        )
    print(json.dumps(result["summary"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
