"""Packing benchmark: packing rate (tokenization excluded), tokenization rate, non-pad fraction.

    .venv/bin/python bench/packing/bench_packing.py [--examples 200000] [--seq-len 2048] [--out bench/results]

Data is synthetic and local: example lengths follow a log-normal with median 150 tokens and a
long tail (sigma 0.9, clipped to [8, seq_len]), a chat-SFT-like mix; texts are drawn from a
Zipf vocabulary of made-up words and tokenized with a byte-level BPE trained here.

Rates are per CPU-second of the process (`time.process_time`): this machine is shared, so its
wall clock measures the neighbours too; wall-clock rates and the load average are recorded beside.

- pack: `pack_examples` over pre-tokenized numpy examples, one process (so tokens/s is per core).
- tokenize: `tokenize_records` over prompt/completion records already in memory (render + Rust
  `encode_batch` + masks + over-long policy; the Rust tokenizer may use every core, so this is
  per process, not per core), and the whole in-process stream `open_stream` from a JSONL file
  (json parse, validate, tokenize, pack).

Writes bench/results/packing_cpu_<yyyymmdd>.json with a top-level "summary" and the environment.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from raytune_llm.packing.packer import Example, pack_examples  # noqa: E402
from raytune_llm.packing.readers import Record  # noqa: E402
from raytune_llm.packing.stream import open_stream, tokenize_records  # noqa: E402
from raytune_llm.packing.tokenizer import train_tokenizer  # noqa: E402
from raytune_llm.packing.validate import DataStats  # noqa: E402


def lognormal_lengths(n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(150), 0.9, n).astype(np.int64), 8, seq_len)


def bench_pack(n: int, seq_len: int, reps: int) -> dict:
    lengths = lognormal_lengths(n, seq_len)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 32000, int(lengths.sum()), dtype=np.int32)
    cuts = np.cumsum(lengths)[:-1]
    examples = [Example(t, t) for t in np.split(tokens, cuts)]
    times, cpu, rows = [], [], 0
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        rows = sum(1 for _ in pack_examples(examples, seq_len, 0, window_rows=256, seed=0))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t, c = float(np.median(times)), float(np.median(cpu))
    return {
        "examples": n,
        "tokens": int(lengths.sum()),
        "rows": rows,
        "seconds_median": t,
        "cpu_seconds_median": c,
        "tokens_per_s_wall": float(lengths.sum() / t),
        "tokens_per_cpu_s": float(lengths.sum() / c),
        "non_pad_fraction": float(lengths.sum() / (rows * seq_len)),
        "length_median": float(np.median(lengths)),
        "length_mean": float(lengths.mean()),
    }


def make_texts(n: int, seq_len: int, seed: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(5000)]
    # Words per record from the token-length mix (about 1.3 tokens a word for this tokenizer).
    words = np.maximum(lognormal_lengths(n, seq_len, seed) // 1.3, 4).astype(int)
    ranks = np.minimum(rng.zipf(1.2, int(words.sum())), len(vocab)) - 1
    out, k = [], 0
    for w in words.tolist():
        text = " ".join(vocab[i] for i in ranks[k : k + w])
        k += w
        cut = max(1, len(text) // 3)
        out.append({"prompt": text[:cut], "completion": text[cut:]})
    return out


def bench_tokenize(records: list[dict], tok, seq_len: int, reps: int) -> dict:
    times, cpu, tokens = [], [], 0
    for _ in range(reps):
        stats = DataStats()
        recs = (Record("mem", i + 1, r) for i, r in enumerate(records))
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in tokenize_records(
            recs, "prompt_completion", tok, seq_len, stats, train_on_prompt=False, overlong="truncate"
        ):
            pass
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        tokens = stats.counts["tokens"]
    t, c = float(np.median(times)), float(np.median(cpu))
    return {
        "records": len(records),
        "tokens": tokens,
        "seconds_median": t,
        "cpu_seconds_median": c,
        "tokens_per_s_wall": tokens / t,
        "tokens_per_cpu_s": tokens / c,
    }


def bench_stream(records: list[dict], tok, seq_len: int, tmp: str) -> dict:
    path = os.path.join(tmp, "data.jsonl")
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    t0, c0 = time.perf_counter(), time.process_time()
    s = open_stream(path, tok, seq_len)
    rows = sum(1 for _ in s)
    t, c = time.perf_counter() - t0, time.process_time() - c0
    return {
        "records": len(records),
        "rows": rows,
        "seconds": t,
        "cpu_seconds": c,
        "records_per_cpu_s": len(records) / c,
        "tokens_per_s_wall": s.stats["tokens"] / t,
        "tokens_per_cpu_s": s.stats["tokens"] / c,
        "non_pad_fraction": s.stats["tokens"] / (rows * seq_len),
    }


def environment() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass

    def ver(d):
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        commit = None
    return {
        "device": "cpu",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        **{p: ver(p) for p in ("numpy", "pyarrow", "tokenizers", "transformers", "datasets", "ray")},
        "git_commit": commit,
        "load_average_1m": os.getloadavg()[0],
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=200_000, help="examples for the packing rate")
    ap.add_argument("--records", type=int, default=20_000, help="records for the tokenization / stream rates")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    pack = bench_pack(args.examples, args.seq_len, args.reps)
    records = make_texts(args.records, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = [r["prompt"] + r["completion"] for r in records[:5000]]
        tok = train_tokenizer(corpus, 8192, os.path.join(tmp, "tok"))
        tokenize = bench_tokenize(records, tok, args.seq_len, args.reps)
        stream = bench_stream(records, tok, args.seq_len, tmp)

    result = {
        # Rates per CPU-second of this process (time.process_time, all its threads): the shared
        # machine's wall clock is not ours (load average in the environment); wall rates are below.
        "summary": {
            "pack_tokens_per_s_per_core": pack["tokens_per_cpu_s"],
            "tokenize_tokens_per_s": tokenize["tokens_per_cpu_s"],
            "non_pad_fraction": pack["non_pad_fraction"],
        },
        "rate_basis": "tokens per CPU-second of the process (time.process_time); *_wall fields: per wall second",
        "seq_len": args.seq_len,
        "pack": pack,
        "tokenize": tokenize,
        "stream": stream,
        "environment": environment(),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"packing_cpu_{_dt.datetime.now(_dt.timezone.utc):%Y%m%d}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'measure':<34}{'per CPU-s':>16}{'per wall s':>16}")
    print(f"{'pack tokens/s (one core)':<34}{pack['tokens_per_cpu_s']:>16,.0f}{pack['tokens_per_s_wall']:>16,.0f}")
    print(f"{'tokenize tokens/s':<34}{tokenize['tokens_per_cpu_s']:>16,.0f}{tokenize['tokens_per_s_wall']:>16,.0f}")
    print(
        f"{'stream tokens/s (JSONL->rows)':<34}{stream['tokens_per_cpu_s']:>16,.0f}{stream['tokens_per_s_wall']:>16,.0f}"
    )
    print(f"{'non-pad fraction (pack)':<34}{pack['non_pad_fraction']:>16.4f}")
    print(f"{'non-pad fraction (stream)':<34}{stream['non_pad_fraction']:>16.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
