"""End-to-end grid: every (shape, stack) pair in its own ``run_stack.py`` process, within a time budget.

Order: shapes in ``--shapes`` order (default 4x2048, 1x2048, packed_8192, 1x16384, 1x65536: the
headline shape first, long rows last), within a shape the stacks in ``--stacks`` order (default
ours, unsloth, std_qlora, liger). A pair whose predicted time (load overhead + steps at a prior
tokens/s, both updated from what this call has measured) does not fit the remaining budget is
recorded as skipped and the next, cheaper pair is tried; a running pair is killed when the budget
runs out. One stack's OOM or crash is recorded and the grid goes on. The JSON is rewritten after
every pair, so a call killed at the device tool's time limit still leaves every finished pair, and
``--resume-from`` that file skips pairs already measured (ok or oom), so several calls complete a grid.

Packed rows (``--replay-warmup``, default ``packed``): each stack runs every step once untimed, gets its trainable
weights and AdamW state back in place and runs the same steps again, timed, so no timed step meets a batch for the
first time. Without it Unsloth's 2nd timed packed step (the first batch of 11 documents) ran 2.2-2.7 s against a
median of ~0.82 s in every packed call on record (the cause not verified: a recompile fits), which raised its mean
step, and so the packed ratio by means, by 16-22% (session 24). A resumed pair is kept only when it ran with this
call's replay setting.

Before the grid one subprocess measures the device: bf16 matmul TFLOP/s (8192^3, median of 20 after
5 warm-ups, CUDA events) and copy bandwidth (1 GiB ``copy_``, read + write counted).

MFU convention (frozen-base LoRA, stated in the JSON): ``(4 * N_linear + 6 * L * s * d) * tokens/s /
measured matmul FLOP/s``, N_linear = every decoder linear + lm_head; s = the row length, or for packed
rows the token-weighted example length ``sum(l^2) / sum(l)`` (the attention work a document mask
leaves). Recomputation under checkpointing is not counted.

Usage (GPU)::

    python bench/e2e/bench_e2e.py --model /tmp/rtl_bench/llama31_8b_random --budget-s 500
    python bench/e2e/bench_e2e.py --resume-from bench/results/e2e_h200_20261128.json --budget-s 500
    python bench/e2e/bench_e2e.py --tiny             # CPU: tiny model, 1x64 and packed_64, std_qlora + ours

Writes ``bench/results/e2e_<gpu>_<yyyymmdd>.json`` (and a copy into ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_ANCHOR_SITE,
    E2E_DIR,
    RESULTS_DIR,
    STACKS,
    child_env,
    environment,
    gpu_slug,
    linear_params,
    log,
    parse_shape,
    utc_day,
    write_json,
)
from make_model import MARKER, config_for, is_complete  # noqa: E402

DEFAULT_MODEL = Path("/tmp/rtl_bench/llama31_8b_random")
TINY_MODEL = Path("/tmp/rtl_bench/tiny_llama")
DEFAULT_SHAPES = "4x2048,1x2048,packed_8192,1x16384,1x65536"
TINY_SHAPES = "1x64,packed_64"
MFU_CONVENTION = (
    "(4 * N_linear + 6 * L * s * d) * tokens/s / measured bf16 matmul FLOP/s (8192^3); N_linear = decoder "
    "linears (q,k,v,o,gate,up,down) + lm_head; forward + input-gradient backward of a frozen base, causal "
    "attention; recompute not counted; packed rows: s = sum(l^2)/sum(l) over examples"
)
# Prior tokens/s per (stack, shape) from shared/ANCHORS.md (H200, same protocol), used only to predict
# whether a pair fits the budget; ours gets the standard stack's figure (the slowest plausible).
PRIOR_TPS = {
    "std_qlora": {"4x2048": 6675, "1x2048": 3704, "packed_8192": 3700, "1x16384": 5522, "1x65536": 2000},
    "liger": {"4x2048": 7746, "1x2048": 3244, "packed_8192": 3244, "1x16384": 6251, "1x65536": 3831},
    "unsloth": {"4x2048": 11294, "1x2048": 5173, "packed_8192": 5173, "1x16384": 8266, "1x65536": 4490},
}
PRIOR_TPS["ours"] = PRIOR_TPS["std_qlora"]
# Seconds of a process outside its steps (imports, 8B load + quantize, Unsloth's compile), before measured.
PRIOR_OVERHEAD_S = {"std_qlora": 50.0, "liger": 55.0, "unsloth": 110.0, "ours": 50.0}


def default_steps(seq: int, tiny: bool) -> tuple[int, int]:
    """(warm-up, timed) per row length: 3 + 10 up to 8k tokens, 3 + 5 at 16k, 2 + 3 beyond (as in ANCHORS.md)."""
    if tiny:
        return 1, 2
    if seq <= 8192:
        return 3, 10
    if seq <= 16384:
        return 3, 5
    return 2, 3


def calibrate(tiny: bool) -> dict:
    """Matmul FLOP/s and copy bandwidth of this device (runs in a subprocess: the driver never touches CUDA)."""
    import torch

    cuda = torch.cuda.is_available() and not tiny
    dev = "cuda" if cuda else "cpu"
    n = 8192 if cuda else 512
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    nbytes = (1 if cuda else 1 / 16) * 2**30
    src = torch.ones(int(nbytes), dtype=torch.int8, device=dev)
    dst = torch.empty_like(src)

    def timed(fn, reps: int, warm: int, warm_s: float = 0.0) -> float:
        for _ in range(warm):
            fn()
        t_warm = time.perf_counter()
        while cuda and time.perf_counter() - t_warm < warm_s:  # the clocks a sustained load runs at, not a burst's
            fn()
            torch.cuda.synchronize()
        ms = []
        for _ in range(reps):
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                torch.cuda.synchronize()
                ms.append(e0.elapsed_time(e1))
            else:
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ms)

    # Session 17's calls read 735.8-793.4 TFLOP/s with 5 warm-up and 20 timed products (~30 ms): a second of
    # products first, then 100 timed, so that MFU's denominator is the rate a training step's GEMMs run at.
    mm_ms = timed(lambda: torch.mm(a, b), 100 if cuda else 3, 5 if cuda else 1, warm_s=1.0)
    cp_ms = timed(lambda: dst.copy_(src), 20 if cuda else 3, 3 if cuda else 1)
    return {
        "device": dev,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "matmul_n": n,
        "matmul_ms": round(mm_ms, 4),
        "matmul_flops": 2 * n**3 / (mm_ms * 1e-3),
        "matmul_tflops": round(2 * n**3 / (mm_ms * 1e-3) / 1e12, 4),
        "copy_bytes": int(nbytes),
        "copy_gbps": round(2 * nbytes / (cp_ms * 1e-3) / 1e9, 1),
        "copy_convention": "dst.copy_(src) of copy_bytes, read + write counted (2x bytes)",
        "environment": environment(torch),
    }


def run_calibration(tiny: bool, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--calibrate-only"] + (["--tiny"] if tiny else [])
    proc = subprocess.run(cmd, env=child_env("calibrate"), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"calibration failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CHILD: list[subprocess.Popen] = []


def _kill_child_and_exit(signum, _frame) -> None:
    """SIGTERM / SIGINT to the driver: take the measured process group down too (it runs in its own session)."""
    for proc in _CHILD:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_child(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, float]:
    """Run one measured process in its own session; kill the whole group at ``timeout``. Returns (rc, seconds)."""
    signal.signal(signal.SIGTERM, _kill_child_and_exit)
    signal.signal(signal.SIGINT, _kill_child_and_exit)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    _CHILD.append(proc)
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    finally:
        _CHILD.remove(proc)
    return rc, time.perf_counter() - t0


def mfu(result: dict, calib: dict | None) -> float | None:
    if result.get("status") != "ok" or not calib or not result.get("flops_per_token"):
        return None
    return round(result["flops_per_token"] * result["tokens_per_s"] / calib["matmul_flops"], 4)


def summarize(runs: dict, shapes: list[str]) -> dict:
    """Per shape: ours against each peer (speed and memory ratios), MFU, loss agreement with std_qlora."""
    summary = {}
    for shape in shapes:
        by = {k: v for k, v in runs.get(shape, {}).items() if v.get("status") == "ok"}
        ours = by.get("ours")

        def ratio(peer: str, key: str, inverse: bool = False, _by=by, _ours=ours) -> float | None:
            other = _by.get(peer)
            if _ours is None or other is None or _ours.get(key) is None or other.get(key) is None:
                return None
            a, b = (other[key], _ours[key]) if inverse else (_ours[key], other[key])
            return round(a / b, 4) if b else None  # 3 places made 1.29914 read 1.3 (session 20)

        loss_diff = None
        if ours is not None and "std_qlora" in by:
            diffs = [abs(a - b) for a, b in zip(ours["losses"], by["std_qlora"]["losses"])]
            # a NaN anywhere makes the agreement infinite (max() passes over a NaN that is not first)
            loss_diff = (round(max(diffs), 5) if all(math.isfinite(d) for d in diffs) else math.inf) if diffs else None
        summary[shape] = {
            "speedup_vs_unsloth": ratio("unsloth", "tokens_per_s"),
            "memory_vs_unsloth": ratio("unsloth", "peak_gib"),
            "speedup_vs_std_qlora": ratio("std_qlora", "tokens_per_s"),
            "memory_vs_std_qlora": ratio("std_qlora", "peak_gib"),
            "speedup_vs_liger": ratio("liger", "tokens_per_s"),
            "memory_vs_liger": ratio("liger", "peak_gib"),
            "mfu": ours.get("mfu") if ours else None,
            "max_loss_diff_vs_std_qlora": loss_diff,
            "tokens_per_s": {k: v.get("tokens_per_s") for k, v in by.items()},
            "peak_gib": {k: v.get("peak_gib") for k, v in by.items()},
            "mfu_by_stack": {k: v.get("mfu") for k, v in by.items()},
            "status": {k: v.get("status") for k, v in runs.get(shape, {}).items()},
            "document_mask": {k: v.get("document_mask") for k, v in by.items() if v.get("document_mask")} or None,
        }
    return summary


def print_table(doc: dict) -> None:
    calib = doc.get("calibration") or {}
    if calib:
        print(f"device {calib.get('gpu')}: matmul {calib['matmul_tflops']} TFLOP/s, copy {calib['copy_gbps']} GB/s")
    head = (
        f"{'shape':<12} {'stack':<10} {'status':<8} {'tokens/s':>10} {'ms/step':>10} {'peak GiB':>9} {'MFU':>6}  note"
    )
    print(head)
    print("-" * len(head))
    for shape, stacks in doc["runs"].items():
        for stack, r in stacks.items():
            if r.get("status") == "ok":
                peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
                m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
                note = r.get("document_mask") or ""
                print(
                    f"{shape:<12} {stack:<10} {'ok':<8} {r['tokens_per_s']:>10,.0f} {r['step_ms_median']:>10.1f} "
                    f"{peak:>9} {m:>6}  {note}"
                )
            else:
                why = r.get("reason") or r.get("error") or ""
                print(
                    f"{shape:<12} {stack:<10} {r.get('status', '?'):<8} {'':>10} {'':>10} {'':>9} {'':>6}  {why[:90]}"
                )
    print("summary (ours vs peers):")
    for shape, s in doc["summary"].items():
        keep = ("speedup_vs_unsloth", "memory_vs_unsloth", "speedup_vs_std_qlora", "mfu", "max_loss_diff_vs_std_qlora")
        print(f"  {shape:<12} " + "  ".join(f"{k}={s[k]}" for k in keep))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="end-to-end grid of stacks x shapes, one process each")
    p.add_argument("--model", type=Path, default=None, help=f"HF folder (default {DEFAULT_MODEL}; built if missing)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the model built when missing (32)")
    p.add_argument("--shapes", default=None, help=f"comma list in run order (default {DEFAULT_SHAPES})")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma list in run order within a shape")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of this call, model build included")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path, default=None, help="explicit result path (default e2e_<gpu>_<date>.json)")
    p.add_argument("--resume-from", type=Path, default=None, help="result JSON whose ok/oom pairs are kept, not rerun")
    p.add_argument("--ckpt-ours", default="on", choices=("on", "offload"), help="ours' gradient checkpointing")
    p.add_argument(
        "--ours-flags",
        default="",
        help="extra run_stack.py flags for ours, space-separated (e.g. '--dequantize-once --stash-attention')",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps for every shape (default per shape)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps for every shape (default per shape)")
    p.add_argument(
        "--replay-warmup",
        default="packed",
        choices=("packed", "all", "none"),
        help="shapes whose stacks run every step once untimed before the timed pass (run_stack --replay-warmup): "
        "packed rows (default; their batches differ in document count, which a compiled stack may recompile for "
        "inside the timed steps), every shape, or none",
    )
    p.add_argument("--anchor-site", default=DEFAULT_ANCHOR_SITE, help="site dir added only for liger / unsloth")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, seq 64, 2 steps")
    p.add_argument("--calibrate-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or (TINY_MODEL if args.tiny else DEFAULT_MODEL)
    args.shapes = [s.strip() for s in (args.shapes or (TINY_SHAPES if args.tiny else DEFAULT_SHAPES)).split(",") if s]
    args.stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    for s in args.stacks:
        if s not in STACKS:
            p.error(f"unknown stack {s!r}: expected some of {', '.join(STACKS)}")
    for s in args.shapes:
        try:
            parse_shape(s)
        except ValueError:
            p.error(f"bad shape {s!r}: expected BxS (4x2048) or packed_S (packed_8192)")
    return args


def ensure_model(args: argparse.Namespace, deadline: float) -> dict:
    """Build the random-weight folder when it is missing (each fresh device machine starts bare)."""
    cfg = config_for(args.tiny, getattr(args, "layers", None))
    if is_complete(args.model, cfg):
        return cfg
    folder = Path(args.model)
    foreign = (folder / "config.json").is_file() and not (folder / MARKER).is_file()
    if foreign and any(folder.glob("model*.safetensors*")):  # a checkpoint not written by make_model: use it as is
        log(f"bench_e2e: using the checkpoint at {folder} as it is (not written by make_model.py)")
        return json.loads((folder / "config.json").read_text())
    log(f"bench_e2e: no complete model at {args.model}; building it")
    cmd = [sys.executable, str(E2E_DIR / "make_model.py"), "--out", str(args.model)] + (["--tiny"] if args.tiny else [])
    cmd += ["--layers", str(args.layers)] if getattr(args, "layers", None) else []
    rc, secs = run_child(cmd, child_env("make_model"), deadline - time.perf_counter())
    if rc != 0 or not is_complete(args.model, cfg):
        raise RuntimeError(f"make_model.py failed (rc {rc}) after {secs:.0f} s")
    log(f"bench_e2e: model built in {secs:.0f} s")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.calibrate_only:
        print(json.dumps(calibrate(args.tiny)), flush=True)
        return 0
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    log(f"bench_e2e: budget {args.budget_s:.0f} s, shapes {args.shapes}, stacks {args.stacks}")

    doc: dict = {}
    if args.resume_from and args.resume_from.is_file():
        doc = json.loads(args.resume_from.read_text())
        log(f"bench_e2e: resuming from {args.resume_from}")
    doc.setdefault("runs", {})
    doc.setdefault("calls", [])
    doc["bench"] = "e2e"
    doc["mfu_convention"] = MFU_CONVENTION
    doc["protocol"] = (
        "Llama-3.1-8B shapes, random bf16 weights (make_model.py), NF4 double-quant bf16 compute, LoRA r=16 "
        "alpha=16 dropout 0 on q,k,v,o,gate,up,down, torch AdamW lr 2e-4, gradient checkpointing, SDPA, seeded "
        "random tokens with labels = inputs, warm-up then timed steps with synchronize around each, peak = "
        "max_memory_allocated over the timed steps; one process per (shape, stack)"
        + (
            "; "
            + {"packed": "packed rows", "all": "every shape"}[args.replay_warmup]
            + ": every step run once untimed first, then the trainable weights and AdamW state restored in place "
            "and the same steps timed (run_stack --replay-warmup)"
            if args.replay_warmup != "none"
            else ""
        )
    )
    doc["tiny"] = args.tiny
    calls = {"started": environment()["date_utc"], "budget_s": args.budget_s, "ran": [], "skipped": []}
    doc["calls"].append(calls)

    cfg = ensure_model(args, deadline)
    doc["model"] = {"path": str(args.model), "config": cfg, "n_linear": linear_params(cfg)}
    if not doc.get("calibration") or doc["calibration"].get("device") != ("cpu" if args.tiny else "cuda"):
        doc["calibration"] = run_calibration(args.tiny, timeout=max(30.0, deadline - time.perf_counter()))
        log(
            f"bench_e2e: matmul {doc['calibration']['matmul_tflops']} TFLOP/s, copy {doc['calibration']['copy_gbps']} GB/s"
        )
    calib = doc["calibration"]
    doc["environment"] = calib["environment"]
    out = args.out or args.resume_from or args.out_dir / f"e2e_{gpu_slug(calib['gpu'])}_{utc_day()}.json"
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"rtl_e2e_runs_{os.getpid()}"

    overhead = dict(PRIOR_OVERHEAD_S)
    for shape in args.shapes:
        batch, seq, packed = parse_shape(shape)
        warm, steps = default_steps(seq, args.tiny)
        warm = args.warmup if args.warmup is not None else warm
        steps = args.steps if args.steps is not None else steps
        replay = args.replay_warmup == "all" or (args.replay_warmup == "packed" and packed)
        for stack in args.stacks:
            prev = doc["runs"].get(shape, {}).get(stack)
            if prev and bool(prev.get("replay_warmup")) != replay:
                log(f"bench_e2e: {shape} {stack}: the resumed run's replay setting differs from this call's; run again")
                prev = None
            if prev and prev.get("status") in ("ok", "oom"):
                log(f"bench_e2e: {shape} {stack}: kept from the resumed file ({prev['status']})")
                continue
            remaining = deadline - time.perf_counter()
            tps = PRIOR_TPS.get(stack, {}).get(shape, 2000.0)
            passes = 2 if replay else 1
            predicted = 0.0 if args.tiny else overhead[stack] + passes * (warm + steps) * batch * seq / tps
            if predicted > remaining:
                reason = f"budget: predicted {predicted:.0f} s > remaining {remaining:.0f} s"
                doc["runs"].setdefault(shape, {})[stack] = {"status": "skipped", "reason": reason}
                calls["skipped"].append(f"{shape}/{stack}")
                log(f"bench_e2e: {shape} {stack}: skipped ({reason})")
                write_json(out, {**doc, "summary": summarize(doc["runs"], args.shapes)})
                continue
            run_out = scratch / f"{shape}_{stack}.json"
            run_out.unlink(missing_ok=True)
            cmd = [sys.executable, str(E2E_DIR / "run_stack.py"), "--stack", stack, "--model", str(args.model)]
            cmd += ["--batch", str(batch), "--seq", str(seq), "--warmup", str(warm), "--steps", str(steps)]
            cmd += ["--out", str(run_out)] + (["--packed"] if packed else []) + (["--tiny"] if args.tiny else [])
            cmd += ["--replay-warmup"] if replay else []
            if stack == "ours":
                cmd += ["--ckpt", args.ckpt_ours] + args.ours_flags.split()
            log(f"bench_e2e: {shape} {stack}: start (predicted {predicted:.0f} s, remaining {remaining:.0f} s)")
            rc, secs = run_child(cmd, child_env(stack, args.anchor_site), remaining)
            if run_out.is_file():
                result = json.loads(run_out.read_text())
            else:
                result = {"status": "error", "error": f"run_stack.py left no result (rc {rc})"}
            if rc is None:
                result.update(status="timeout", reason=f"killed at the budget after {secs:.0f} s")
            if result.get("status") != "error":
                result.pop("traceback", None)
            result["wall_s"] = round(secs, 1)
            result["mfu"] = mfu(result, calib)
            doc["runs"].setdefault(shape, {})[stack] = result
            calls["ran"].append(f"{shape}/{stack}:{result['status']}")
            if result.get("status") == "ok":
                steps_s = (sum(result["step_ms_all"]) + sum(result.get("replay_pass_ms", []))) / 1e3
                overhead[stack] = secs - steps_s  # measured imports + load (+ compile) of this machine
            log(f"bench_e2e: {shape} {stack}: {result['status']} in {secs:.0f} s")
            write_json(out, {**doc, "summary": summarize(doc["runs"], args.shapes)})

    # Every headline shape gets a summary entry (nulls where nothing ran), resumed shapes included.
    every = args.shapes + list(doc["runs"]) + ([] if args.tiny else DEFAULT_SHAPES.split(","))
    doc["summary"] = summarize(doc["runs"], list(dict.fromkeys(every)))
    calls["finished_s"] = round(time.perf_counter() - t_start, 1)
    write_json(out, doc)
    log(f"bench_e2e: wrote {out}")
    print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
