"""Fixtures for the packing tests: one locally trained tokenizer per session and small data files."""

from __future__ import annotations

import json

import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Packing puts several short examples into one row of exactly seq_len tokens.",
    "Hello world! What is the capital of France? Paris is the capital of France.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "user assistant system: answer the question briefly and politely.",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from raytune_llm.packing.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 50, 400, tmp_path_factory.mktemp("tok"))


def write_jsonl(path, records, raw_lines=()):
    """Write records as JSONL; raw_lines are (index, text) inserted verbatim before record `index`."""
    raw = dict(raw_lines)
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            if i in raw:
                f.write(raw[i] + "\n")
            f.write(json.dumps(r) + "\n")
    return str(path)
