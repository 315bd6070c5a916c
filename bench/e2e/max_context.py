"""Longest trainable context on an 80 GiB budget, and the 70B-on-one-GPU check.

A length "fits" when one full step (forward, backward, AdamW step) at batch 1 succeeds with
``torch.cuda.set_per_process_memory_fraction(80 GiB / total)`` (the H200 has 141 GiB; the cap makes the
figure that of an 80 GB card). QLoRA r=16 on all linear projections, random tokens, labels = inputs.

Targets (``--targets``, run in this order by default):

- ``ours_8b``: ``load_model`` on the 8B folder, ``--ckpt-ours`` (default offload, as Unsloth offloads too);
- ``run_70b_4096``: ours on 70B shapes (``build_synthetic_model``, never on disk) at seq 4096: peak GiB and
  tokens/s over 1 warm-up + 3 timed steps, checkpointing ``--ckpt-70b-4096`` (default on);
- ``ours_70b``: the 70B search;
- ``unsloth_8b``: Unsloth 4-bit on the 8B folder.

Search, per target: every attempt is a fresh ``run_stack.py`` process (an OOM leaves the allocator in
an unknown state). Lengths grow by doubling from ``--start`` until one fails (or shrink by halving when
the first fails), then bisect until ``fail / ok - 1 <= --tol`` (5%). Because peak memory grows about
linearly with the length once weights are loaded, two successes give a fit ``peak = a + b * s``; its
prediction of the length that fills the cap is tried instead of a blind double or midpoint when it lies
safely inside the bracket, which typically saves two or three attempts (each costs a model load).
Lengths are multiples of 1024. The time budget is shared: each target gets a share of the remaining
time (a search weighs 3, the single 70B run 1), so a slow one cannot starve the others; an attempt that
would not fit its share is not started, one killed by the budget ends its target's search (the bracket
so far is kept, and ``--resume-from`` continues it in a later call). Tokens/s of an attempt is that of its one step (so it
includes first-step costs such as kernel autotuning) unless ``--attempt-warmup`` is raised.

Writes ``bench/results/bigmodel_<gpu>_<yyyymmdd>.json`` after every attempt (copied into ``$OUT``);
``--resume-from`` continues the searches of an earlier file.

Usage::

    python bench/e2e/max_context.py --model /tmp/rtl_bench/llama31_8b_random --budget-s 540
    python bench/e2e/max_context.py --tiny          # CPU: no memory cap there, searches stop at --max-seq (128)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_ANCHOR_SITE,
    E2E_DIR,
    RESULTS_DIR,
    child_env,
    environment,
    gpu_slug,
    log,
    utc_day,
    write_json,
)
from bench_e2e import DEFAULT_MODEL, TINY_MODEL, ensure_model, run_child  # noqa: E402

TARGETS = {
    # name: (stack, synthetic key or None, start length, prior tokens/s, prior seconds outside the step)
    # Starts sit below the published Unsloth figures on 80 GB (8B: 342,733; 70B: 89,389), so the first
    # attempt should succeed and the second (a double, or the memory fit's guess) brackets the limit.
    "ours_8b": ("ours", None, 131072, 3000.0, 60.0),
    "run_70b_4096": ("ours", "70b", 4096, 600.0, 150.0),
    "ours_70b": ("ours", "70b", 32768, 500.0, 150.0),
    "unsloth_8b": ("unsloth", None, 131072, 3000.0, 120.0),
}
TINY_SYNTHETIC = {"70b": "tiny70b"}
FULL_LAYERS = {"8b": 32, "70b": 80}  # depth a --reduced-layers model stands for (ballast for the rest)


def gpu_name(tiny: bool) -> str:
    """The GPU's name from nvidia-smi (the driver process never creates a CUDA context of its own)."""
    if tiny:
        return "cpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "gpu"
    except (OSError, subprocess.SubprocessError):
        return "gpu"


def round_len(s: float, quantum: int) -> int:
    return max(quantum, int(round(s / quantum)) * quantum)


def next_length(attempts: list[dict], cap_gib: float, tol: float, quantum: int, max_seq: int) -> int | None:
    """The next length to try from the attempts so far, or None when the bracket is tight enough.

    Without a memory fit: double past the largest success (halve below a first failure), then bisect.
    With one (two successes with peaks): aim 1% under the length the fit says fills the cap; when the
    largest success is already within ``tol`` of that, probe ``(1 + tol) * ok`` so one failure closes
    the search.

    Args:
        attempts: dicts with "seq", "ok" and, for successes, "peak_gib".
        cap_gib: the memory cap (the linear fit's target).
        tol: stop when smallest failure / largest success - 1 <= tol.
        quantum: lengths are multiples of this.
        max_seq: never try beyond this (a success there ends the search as a lower bound).

    Returns:
        A length not tried yet, or None.
    """
    oks = sorted(a["seq"] for a in attempts if a["ok"])
    lo = oks[-1] if oks else None
    hi = min((a["seq"] for a in attempts if not a["ok"] and (lo is None or a["seq"] > lo)), default=None)
    tried = {a["seq"] for a in attempts}
    if lo is None:  # every attempt failed: halve below the smallest failure
        cand = round_len(hi / 2, quantum) if hi and hi > quantum else None
        return cand if cand not in tried else None
    if lo >= max_seq or (hi is not None and hi / lo - 1 <= tol):
        return None
    pred = None
    pts = sorted((a["seq"], a["peak_gib"]) for a in attempts if a["ok"] and a.get("peak_gib") is not None)
    if len(pts) >= 2 and pts[-1][0] > pts[0][0] and pts[-1][1] > pts[0][1]:
        (s1, p1), (s2, p2) = pts[0], pts[-1]
        pred = s2 + (cap_gib - p2) * (s2 - s1) / (p2 - p1)
    upper = hi if hi is not None else min(4 * lo, max_seq + quantum)
    if pred is not None and pred <= lo * (1 + tol):
        cand = (lo * (1 + tol)) // quantum * quantum  # the fit says lo is at the limit: one probe closes it
    elif pred is not None and pred < upper:
        cand = round_len(0.99 * pred, quantum)
    elif hi is None:
        cand = round_len(2 * lo, quantum)
    else:
        cand = round_len((lo + hi) / 2, quantum)
    cand = min(cand, max_seq)
    if cand in tried or cand <= lo or (hi is not None and cand >= hi):
        cand = round_len((lo + (hi if hi is not None else 2 * lo)) / 2, quantum)
        if cand in tried or cand <= lo or (hi is not None and cand >= hi):
            return None
    return int(cand)


def attempt(
    args: argparse.Namespace, name: str, seq: int, warmup: int, steps: int, timeout: float, ckpt: str | None = None
) -> dict:
    """One fresh run_stack.py process at one length; returns its result dict (status ok/oom/error/timeout)."""
    stack, synthetic, *_ = TARGETS[name]
    out = Path("/tmp") / f"rtl_maxctx_{name}_{seq}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(E2E_DIR / "run_stack.py"), "--stack", stack, "--batch", "1", "--seq", str(seq)]
    cmd += ["--warmup", str(warmup), "--steps", str(steps), "--out", str(out)]
    if synthetic:
        cmd += ["--synthetic", TINY_SYNTHETIC[synthetic] if args.tiny else synthetic]
        if args.reduced_layers and name != "run_70b_4096":
            cmd += ["--layers", str(args.reduced_layers), "--stand-for-layers", str(FULL_LAYERS[synthetic])]
    else:
        cmd += ["--model", str(args.model)]
        if args.reduced_layers:
            cmd += ["--stand-for-layers", str(FULL_LAYERS["8b"])]
    if stack == "ours":
        cmd += ["--ckpt", ckpt or args.ckpt_ours]
    cmd += ["--tiny"] if args.tiny else ["--mem-cap-gib", str(args.cap_gib)]
    log(f"max_context: {name} seq {seq}: start ({timeout:.0f} s left for it)")
    rc, secs = run_child(cmd, child_env(stack, args.anchor_site), timeout)
    res = json.loads(out.read_text()) if out.is_file() else {"status": "error", "error": f"no result (rc {rc})"}
    if rc is None:
        res.update(status="timeout", reason=f"killed at the budget after {secs:.0f} s")
    if res.get("status") != "error":
        res.pop("traceback", None)
    res["wall_s"] = round(secs, 1)
    log(
        f"max_context: {name} seq {seq}: {res['status']} in {secs:.0f} s"
        + (f", peak {res.get('peak_gib')} GiB, {res.get('tokens_per_s')} tokens/s" if res["status"] == "ok" else "")
    )
    return res


def slim(seq: int, res: dict) -> dict:
    keep = ("status", "tokens_per_s", "step_ms_median", "peak_gib", "peak_reserved_gib", "load_s", "wall_s", "error")
    keep += ("layers_run", "stands_for_layers", "layer_resident_mib", "layer_at_load_mib", "ballast_gib")
    return {"seq": seq, "ok": res.get("status") == "ok", **{k: res.get(k) for k in keep if k in res}}


def search(args: argparse.Namespace, name: str, state: dict, deadline: float, doc: dict, out: Path) -> None:
    _, _, start, tps, overhead = TARGETS[name]
    quantum = 16 if args.tiny else 1024
    start = args.tiny_start if args.tiny else args.start.get(name, start)
    attempts = state.setdefault("attempts", [])
    state.pop("stopped", None)  # from an earlier call being resumed
    while True:
        seq = start if not attempts else next_length(attempts, args.cap_gib, args.tol, quantum, args.max_seq)
        if seq is None:
            state["done"] = True
            break
        remaining = deadline - time.perf_counter()
        steps = args.attempt_warmup + 1
        predicted = 0.0 if args.tiny else overhead + steps * seq / tps
        if predicted > remaining:
            state["stopped"] = f"budget: seq {seq} predicted {predicted:.0f} s > remaining {remaining:.0f} s"
            log(f"max_context: {name}: {state['stopped']}")
            break
        res = attempt(args, name, seq, args.attempt_warmup, 1, remaining)
        if res["status"] == "timeout":
            state["stopped"] = res["reason"] + f" at seq {seq}"
            break
        if res["status"] == "skipped":
            state["stopped"] = f"skipped: {res.get('reason')}"
            break
        attempts.append(slim(seq, res))
        if res["status"] == "error" and not any(a["ok"] for a in attempts):
            state["stopped"] = f"error before any success: {res.get('error', '')[:300]}"
            break
        if res["status"] == "ok":
            tps = max(1.0, res["tokens_per_s"])
            overhead = max(10.0, res["wall_s"] - sum(res.get("step_ms_all", [])) / 1e3)
        bracket(state, args.max_seq)
        finish(doc, out)
    bracket(state, args.max_seq)


def bracket(state: dict, max_seq: int) -> None:
    """Largest success and smallest failure above it, kept current so a killed call still has them."""
    attempts = state.get("attempts", [])
    oks = [a["seq"] for a in attempts if a["ok"]]
    state["max_ok"] = max(oks) if oks else None
    fails = [a["seq"] for a in attempts if not a["ok"] and a["seq"] > max(oks, default=0)]
    state["min_fail"] = min(fails) if fails else None
    state["capped_at_max_seq"] = bool(oks) and max(oks) >= max_seq


def finish(doc: dict, out: Path) -> None:
    t = doc["targets"]
    run70 = t.get("run_70b_4096", {}).get("result") or {}
    doc["summary"] = {
        "max_context_8b": t.get("ours_8b", {}).get("max_ok"),
        "max_context_8b_unsloth": t.get("unsloth_8b", {}).get("max_ok"),
        "max_context_70b": t.get("ours_70b", {}).get("max_ok"),
        "tokens_per_s_70b_4096": run70.get("tokens_per_s") if run70.get("status") == "ok" else None,
        "peak_gib_70b_4096": run70.get("peak_gib") if run70.get("status") == "ok" else None,
    }
    write_json(out, doc)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="longest trainable context under an 80 GiB cap; 70B at 4096")
    p.add_argument("--model", type=Path, default=None, help=f"8B HF folder (default {DEFAULT_MODEL}; built if missing)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the 8B-wide model built when missing")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list in run order, of {', '.join(TARGETS)}")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of this call")
    p.add_argument("--cap-gib", type=float, default=80.0, help="per-process memory cap")
    p.add_argument("--tol", type=float, default=0.05, help="stop when smallest failure / largest success - 1 <= tol")
    p.add_argument("--max-seq", type=int, default=None, help="never try beyond (default 1,048,576; 128 with --tiny)")
    p.add_argument("--ckpt-ours", default="offload", choices=("on", "offload"), help="ours' gradient checkpointing")
    p.add_argument("--start", default="", help="first length per target, e.g. ours_8b=65536,ours_70b=16384")
    p.add_argument(
        "--ckpt-70b-4096",
        default="on",
        choices=("on", "offload"),
        help="checkpointing of the 70B run at 4096 (its ~5 GiB of checkpoints fit; offload would only slow it)",
    )
    p.add_argument(
        "--reduced-layers",
        type=int,
        default=None,
        help="searches run models of this many decoder layers holding the other layers' resident memory as a "
        "measured ballast (run_stack.py --stand-for-layers): the same memory, a fraction of the step time",
    )
    p.add_argument("--attempt-warmup", type=int, default=0, help="untimed steps before the one that is timed")
    p.add_argument("--steps-70b", type=int, default=3, help="timed steps of the 70B run at 4096 (after 1 warm-up)")
    p.add_argument("--out", type=Path, default=None, help="result path (default bigmodel_<gpu>_<date>.json)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--resume-from", type=Path, default=None, help="continue the searches of an earlier result file")
    p.add_argument("--anchor-site", default=DEFAULT_ANCHOR_SITE)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, lengths 64..128")
    args = p.parse_args(argv)
    if args.reduced_layers and not args.tiny:
        args.layers = args.reduced_layers
        args.model = args.model or DEFAULT_MODEL.with_name(f"{DEFAULT_MODEL.name}_{args.reduced_layers}l")
    args.model = args.model or (TINY_MODEL if args.tiny else DEFAULT_MODEL)
    args.max_seq = args.max_seq or (128 if args.tiny else 1 << 20)
    args.tiny_start = 64
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        args.start = {k.strip(): int(v) for k, v in (kv.split("=") for kv in args.start.split(",") if kv.strip())}
    except ValueError:
        p.error(f"bad --start {args.start!r}: expected name=length[,name=length]")
    for t in args.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}: expected some of {', '.join(TARGETS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    doc: dict = json.loads(args.resume_from.read_text()) if args.resume_from and args.resume_from.is_file() else {}
    gpu = gpu_name(args.tiny)
    out = args.out or args.resume_from or args.out_dir / f"bigmodel_{gpu_slug(gpu)}_{utc_day()}.json"
    doc.update(
        bench="bigmodel",
        gpu=gpu,
        cap_gib=args.cap_gib,
        tol=args.tol,
        ckpt_ours=args.ckpt_ours,
        reduced_layers=args.reduced_layers,
        tiny=args.tiny,
        protocol=(
            "batch 1, QLoRA NF4 r=16 alpha=16 on q,k,v,o,gate,up,down, AdamW lr 2e-4, random tokens, labels = "
            "inputs; a length fits when one full step succeeds under set_per_process_memory_fraction(cap / total); "
            "each attempt a fresh process"
        ),
        driver_environment=environment(),
    )
    doc.setdefault("targets", {})
    log(f"max_context: budget {args.budget_s:.0f} s, targets {args.targets}, cap {args.cap_gib} GiB, out {out}")
    needs_disk_model = any(TARGETS[t][1] is None for t in args.targets)
    if needs_disk_model:
        ensure_model(args, deadline)
    for i, name in enumerate(args.targets):
        state = doc["targets"].setdefault(name, {})
        if state.get("done"):
            log(f"max_context: {name}: already complete in the resumed file")
            continue
        # Searches weigh 3, the single 70B run 1: a search needs several loads, the run one.
        weights = [1.0 if t == "run_70b_4096" else 3.0 for t in args.targets[i:]]
        share = (deadline - time.perf_counter()) * weights[0] / sum(weights)
        target_deadline = time.perf_counter() + share
        if name == "run_70b_4096":
            _, _, seq, tps, overhead = TARGETS[name]
            seq = args.tiny_start if args.tiny else seq
            predicted = 0.0 if args.tiny else overhead + (1 + args.steps_70b) * seq / tps
            remaining = deadline - time.perf_counter()
            if predicted > remaining:
                state["stopped"] = f"budget: predicted {predicted:.0f} s > remaining {remaining:.0f} s"
                log(f"max_context: {name}: {state['stopped']}")
                continue
            res = attempt(args, name, seq, 1, args.steps_70b, remaining, ckpt=args.ckpt_70b_4096)
            state.update(result=res, done=res.get("status") in ("ok", "oom"))
        else:
            search(args, name, state, target_deadline, doc, out)
        finish(doc, out)
    finish(doc, out)
    log(f"max_context: wrote {out}")
    for name, st in doc["targets"].items():
        if name == "run_70b_4096":
            r = st.get("result") or {}
            print(f"{name:<14} {r.get('status')} tokens/s={r.get('tokens_per_s')} peak_gib={r.get('peak_gib')}")
            continue
        tried = ", ".join(f"{a['seq']}:{'ok' if a['ok'] else a['status']}" for a in st.get("attempts", []))
        print(f"{name:<14} max_ok={st.get('max_ok')} min_fail={st.get('min_fail')} {st.get('stopped') or ''} [{tried}]")
    print("summary:", json.dumps(doc["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
