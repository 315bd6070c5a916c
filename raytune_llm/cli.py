"""`raytune-llm` command line: train, sweep, export, plan, validate.

Each handler loads the config, calls one orchestration function and returns an exit code. A user
error (bad config, missing file, bad data, more workers than devices) prints one line on stderr
and exits 2; `RAYTUNE_LLM_DEBUG=1` shows the traceback instead. `validate` and `plan` import
neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_USER_ERROR = 2


def _user_error_types() -> tuple[type[BaseException], ...]:
    from raytune_llm.config import ConfigError

    types: list[type[BaseException]] = [ConfigError, FileNotFoundError, NotADirectoryError, PermissionError]
    for mod, name in (
        ("raytune_llm.train.errors", "UserError"),
        ("raytune_llm.packing.validate", "DataError"),
        ("raytune_llm.export", "ExportError"),
        ("raytune_llm.sharding.planner", "PlanError"),
    ):
        module = sys.modules.get(mod)
        if module is not None and hasattr(module, name):
            types.append(getattr(module, name))
    return tuple(types)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if "\n" not in text else text  # ConfigError lists one problem per line on purpose


def _load(args):
    from raytune_llm.config import load_config

    return load_config(args.config, args.overrides)


def cmd_validate(args) -> int:
    t0 = time.perf_counter()
    cfg = _load(args)
    checked = []
    from raytune_llm.train.preflight import preflight, resolve_data_paths

    if cfg.sweep:
        from raytune_llm.tune.space import parse_sweep

        spec = parse_sweep(cfg)
        if spec.eval_path:
            resolve_data_paths(spec.eval_path, "sweep.eval_path")
        checked.append(f"sweep: {len(spec.space)} key(s)")
    stats = preflight(cfg)  # what `train` checks before Ray starts: paths, output_dir, LoRA targets, tokenizer, data
    if cfg.data.path:
        checked.append(f"data: {stats.get('records', 0)} records, {stats.get('bad_records', 0)} bad")
    from raytune_llm.train.preflight import layer_count_notes

    for line in layer_count_notes(cfg):
        print(line)
    print(
        f"{args.config or 'defaults'}: OK ({time.perf_counter() - t0:.2f} s){'; ' if checked else ''}{'; '.join(checked)}"
    )
    return 0


def cmd_train(args) -> int:
    from raytune_llm.train.driver import run_training

    cfg = _load(args)
    summary = run_training(cfg)
    _print_summary(summary)
    return 0


def _print_summary(s: dict) -> None:
    rows = [
        ("run folder", s["run_dir"]),
        ("steps", s["steps"]),
        ("loss first -> final", f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s["final_loss"] else "-"),
        (
            "exact match before -> after",
            f"{s['exact_match_before']:.3f} -> {s['exact_match_after']:.3f}"
            if s["exact_match_after"] is not None
            else "-",
        ),
        ("workers", f"{s['workers']} ({'GPU' if s['use_gpu'] else 'CPU'})"),
        ("exports", ", ".join(f"{k}: {v}" for k, v in s["exports"].items()) or "-"),
        ("wall time", f"{s['wall_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows))


def cmd_sweep(args) -> int:
    from raytune_llm.tune.sweep import run_sweep

    cfg = _load(args)
    table = run_sweep(cfg)
    print(table)
    return 0


def cmd_export(args) -> int:
    from raytune_llm.export import ExportError, export

    if args.format == "gguf" and args.dtype is not None:
        raise ExportError("--dtype applies to hf and adapter exports; a GGUF file takes --gguf-type")
    if args.format != "gguf" and args.gguf_type is not None:
        raise ExportError(f"--gguf-type applies to gguf exports, not {args.format}")
    out = export(
        args.source, args.format, out=args.out, dtype=args.dtype or "bf16", gguf_type=args.gguf_type or "f16",
        force=args.force,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


def cmd_plan(args) -> int:
    from raytune_llm.sharding import planner

    cfg = _load(args)
    from raytune_llm.train.preflight import capped_notes, model_hf_config

    hf = model_hf_config(cfg, args.shape)
    from raytune_llm.train.sharded import plan_for

    gpus = args.gpus_per_node if args.gpus_per_node is not None else cfg.train.num_workers
    for flag, value in (("--gpus-per-node", gpus), ("--nodes", args.nodes)):
        if value < 1:
            raise planner.PlanError(f"{flag} must be a positive integer, got {value}")
    plan = plan_for(cfg, hf, gpus_per_node=gpus, nodes=args.nodes)
    print(plan.table())
    for line in capped_notes(hf, plan):
        print(line)
    host = plan.breakdown.get("host: offloaded (not on GPU)", 0)
    if host and plan.strategy == "DDP" and cfg.sharding.strategy in ("auto", "ddp"):  # ZeRO's states: its own
        from raytune_llm.sharding.host_memory import node_memory_needed

        print(
            f"host: {host / 2**30:.2f} GiB per GPU worker, {gpus} per node: a node needs "
            f"{node_memory_needed(host, gpus) / 2**30:.1f} GiB of memory or more (with the reserve the workers check)"
        )
    configured = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}.get(cfg.sharding.strategy)
    if configured is None:  # auto: the run takes the plan's choice
        return 0 if plan.fits else 1
    if configured == "ZeRO-3" and cfg.sharding.offload_params:
        configured = "ZeRO-3+offload"  # the planner models parameters and optimizer states offloaded together
    peak = plan.alternatives[configured]
    fits = peak <= plan.usable_bytes
    other = (
        f"; the table above is the plan's choice, {plan.strategy}" if plan.fits and plan.strategy != configured else ""
    )
    if cfg.sharding.offload_optimizer and configured != "ZeRO-3+offload":
        other += " (sharding.offload_optimizer is not modeled: the figure keeps the optimizer states on the GPU)"
    print(
        f"configured: sharding.strategy={cfg.sharding.strategy} ({configured}) {peak / 2**30:.2f} GiB per GPU, "
        f"{'fits' if fits else 'does NOT fit'} the {plan.usable_bytes / 2**30:.2f} GiB usable{other}"
    )
    return 0 if fits else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytune-llm", description="Fused-kernel LoRA / QLoRA fine-tuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("config", nargs=None if required else "?", help="run YAML (conf/*.yaml)")
        sp.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. train.max_steps=50")

    sp = sub.add_parser("train", help="fine-tune with Ray Train")
    with_config(sp)
    sp.set_defaults(fn=cmd_train)
    sp = sub.add_parser("sweep", help="Ray Tune sweep over the config's `sweep` section")
    with_config(sp)
    sp.set_defaults(fn=cmd_sweep)
    sp = sub.add_parser("validate", help="check a config (and its data) without starting Ray")
    with_config(sp)
    sp.set_defaults(fn=cmd_validate)
    sp = sub.add_parser("plan", help="predict per-GPU memory and pick a sharding strategy")
    with_config(sp)
    sp.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs on each node (default: the config's train.num_workers)"
    )
    sp.add_argument("--nodes", type=int, default=1, help="nodes of that many GPUs (default 1)")
    sp.add_argument(
        "--shape", default=None, help="plan for a known shape instead of model.path: llama-3.1-8b, llama-3.1-70b"
    )
    sp.set_defaults(fn=cmd_plan)
    sp = sub.add_parser("export", help="export a run or checkpoint: merged HF, PEFT adapter or GGUF")
    sp.add_argument("source", help="run folder, checkpoint or adapter folder")
    sp.add_argument("--format", choices=["hf", "adapter", "gguf"], required=True)
    sp.add_argument("--out", default=None, help="output folder inside the run folder (default exports/<format>)")
    sp.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32", "auto"],
        default=None,
        help="hf/adapter weights (default bf16; auto: as stored)",
    )
    sp.add_argument("--gguf-type", choices=["f16", "bf16", "q8_0"], default=None, help="gguf only (default f16)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing export")
    sp.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`plan FILE --nodes 2 key=value`) land here, not in `overrides`.
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("raytune-llm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `raytune-llm plan ... | head`: the reader went away; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if os.environ.get("RAYTUNE_LLM_DEBUG") == "1" or not isinstance(exc, _user_error_types()):
            if os.environ.get("RAYTUNE_LLM_DEBUG") == "1":
                raise
            # Unexpected failures: still one line first, then the traceback for the bug report.
            print(
                f"raytune-llm: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                file=sys.stderr,
            )
            import traceback

            traceback.print_exc()
            return 1
        print(f"raytune-llm: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
