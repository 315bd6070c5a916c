"""The embedded default's task: a deterministic synthetic instruction dataset and its exact-match metric.

Four short string tasks whose answers are single words or digits, so a 2-layer model with LoRA
learns them in a few CPU minutes and exact match is unambiguous:

    first: fox owl cat      -> fox        (copy by position)
    last: fox owl cat       -> cat
    next: 4                 -> 5          (successor of a digit, wraps 9 -> 0)
    add: 3 5                -> 8          (one-digit sums, answers 0-9)

Held-out examples come from a different seed, and for the word tasks from word triples never
seen in training, so accuracy after training measures generalisation, not recall.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

WORDS = (
    "fox owl cat dog bee ant elk yak cow hen pig ram eel bat emu gnu "
    "red blue green gold pink gray teal navy "
    "oak elm fir ash yew "
    "sun moon star rain snow wind fog ice "
    "cup pan jar box bag hat map pen key "
    "one two six ten"
).split()
"""64 short words; each becomes one token of the tokenizer trained on this data."""


def _example(rng: random.Random, kind: str) -> dict:
    if kind in ("first", "last"):
        words = rng.sample(WORDS, 3)
        answer = words[0] if kind == "first" else words[-1]
        return {"prompt": f"{kind}: {' '.join(words)} ->", "completion": f" {answer}"}
    if kind == "next":
        d = rng.randrange(10)
        return {"prompt": f"next: {d} ->", "completion": f" {(d + 1) % 10}"}
    a = rng.randrange(10)
    b = rng.randrange(10 - a)
    return {"prompt": f"add: {a} {b} ->", "completion": f" {a + b}"}


KINDS = ("first", "last", "next", "add")


def make_examples(n: int, seed: int) -> list[dict]:
    """`n` prompt/completion records, the four kinds in turn, deterministic for `seed`."""
    rng = random.Random(seed)
    return [_example(rng, KINDS[i % len(KINDS)]) for i in range(n)]


def make_split(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out records; held-out word triples never appear in training."""
    train = make_examples(n_train, seed)
    seen = {r["prompt"] for r in train}
    held: list[dict] = []
    rng_seed = seed + 1_000_003
    while len(held) < n_eval:
        for r in make_examples(max(n_eval, 64), rng_seed):
            word_task = r["prompt"].startswith(("first", "last"))
            if (not word_task or r["prompt"] not in seen) and len(held) < n_eval:
                held.append(r)
        rng_seed += 1
    return train, held


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as JSON lines (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path


def corpus(records: Iterable[dict]) -> list[str]:
    """Texts a tokenizer is trained on."""
    return [r["prompt"] + r["completion"] for r in records]


def exact_match(generate: Callable[[list[str]], list[str]], records: list[dict]) -> float:
    """Share of records whose generated completion's first word equals the reference answer.

    Args:
        generate: maps prompts to generated continuations (greedy).
        records: prompt/completion records.
    """
    if not records:
        return 0.0
    outs = generate([r["prompt"] for r in records])
    hits = 0
    for r, out in zip(records, outs):
        words = out.strip().split()
        hits += bool(words) and words[0] == r["completion"].strip()
    return hits / len(records)
