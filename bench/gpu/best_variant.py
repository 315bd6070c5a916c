"""The fastest finished variant of run_stack's --variants JSON files, as the flags that run it in bench_e2e.py.

    python3 bench/gpu/best_variant.py FILE... [--max-peak-gib 8.05] [--default "FLAGS"] [--extra "FLAGS"]

Prints the `--ours-flags` of the variant with the lowest median step among those with status ok and, with
--max-peak-gib, a peak at most that (Unsloth's, for issue 5's memory goal), followed by --extra (what the variant
run set for all of them, e.g. --mlp-chunk-tokens 0); --default when none qualifies. Each variant's flags are read
off its name (run_stack.parse_variants), so the e2e runs what the variant timed. The choice and its figures go to
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from run_stack import parse_variants  # noqa: E402


def variant_flags(name: str) -> str:
    """run_stack / bench_e2e flags for a variant name; one that sets what no flag does (``+full``, ``+sep``, the
    checkpointing mode, which bench_e2e's --ckpt-ours sets for the whole run) is refused."""
    (v,) = parse_variants(name.split("#")[0])
    unflagged = [k for k, off in (("mode", None), ("lean", True), ("fused_residuals", True)) if v[k] != off]
    if unflagged:
        raise SystemExit(f"best_variant: {name!r} sets {', '.join(unflagged)}, which no run_stack flag sets")
    flags = [] if v["layers"] is None else ["--checkpoint-layers", str(v["layers"])]
    if v["stash"]:
        flags.append("--stash-attention")
        flags += [] if v["stash_o"] else ["--no-stash-o-proj"]
    for key, flag in (
        ("once", "--dequantize-once"),
        ("host", "--embeddings-on-host"),
        ("head_host", "--head-on-host"),
        ("weights_host", "--weights-on-host"),
        ("graph", "--cuda-graph"),
    ):
        flags += [flag] if v[key] else []
    if v["chunk"] is not None:
        flags += ["--mlp-chunk-tokens", str(v["chunk"])]
    dev = v["last_on_device"]
    flags += ["--last-layer-on-device"] + ([] if dev is True else [str(dev)]) if dev else []
    flags += ["--keep-mlp-layers", str(v["keep"])] if v["keep"] else []
    flags += ["--keep-mlp-layers-on-host", str(v["keep_host"])] if v["keep_host"] else []
    flags += ["--keep-mlp-gate-on-host", str(v["gate_host"])] if v["gate_host"] else []
    flags += ["--offload-lag", str(v["lag"])] if v["lag"] else []
    return " ".join(flags)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--max-peak-gib", type=float, default=None)
    ap.add_argument("--default", default="")
    ap.add_argument("--extra", default="")
    args = ap.parse_args(argv)
    best = None
    for path in args.files:
        try:
            variants = json.loads(Path(path).read_text()).get("variants", {})
        except (OSError, ValueError) as exc:
            print(f"best_variant: {path}: {exc}", file=sys.stderr)
            continue
        for name, v in variants.items():
            if v.get("status") != "ok" or v.get("step_ms_median") is None:
                continue
            if args.max_peak_gib is not None and (v.get("peak_gib") or 0) > args.max_peak_gib:
                continue
            if best is None or v["step_ms_median"] < best[0]:
                best = (v["step_ms_median"], name, v.get("peak_gib"))
    if best is None:
        print(f"best_variant: none qualifies; the default: {args.default}", file=sys.stderr)
        print(args.default)
        return 0
    print(f"best_variant: {best[1]} {best[0]} ms, peak {best[2]} GiB", file=sys.stderr)
    print(" ".join(filter(None, [variant_flags(best[1]), args.extra])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
