"""Ray Data path: build_ray_dataset gives the same examples as the in-process stream, split across workers.

Uses the session-wide `ray_session` fixture of tests/conftest.py (one local cluster for all Ray tests).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from raytune_llm.packing.stream import build_ray_dataset, iter_torch_batches, open_stream
from raytune_llm.packing.validate import DataError

from .conftest import write_jsonl

pytestmark = pytest.mark.ray


def segments(input_ids, seq_lens, pad_id):
    """The examples of packed rows, as tuples of token ids (padding segments left out)."""
    out, start = [], 0
    for n in seq_lens:
        seg = tuple(int(t) for t in input_ids[start : start + n])
        if seg[0] != pad_id:
            out.append(seg)
        start += n
    return out


def records(n, offset=0):
    return [{"prompt": f"Question {i}: fox", "completion": " dog" * (1 + i % 9)} for i in range(offset, offset + n)]


def test_ray_dataset_matches_stream_and_splits(ray_session, tmp_path, tokenizer):
    tok_dir = str(tmp_path / "tok")
    tokenizer.save_pretrained(tok_dir)
    write_jsonl(tmp_path / "a.jsonl", records(120))
    write_jsonl(tmp_path / "b.jsonl", records(80, 120), raw_lines=[(7, "{bad")])
    paths = str(tmp_path / "*.jsonl")
    ds, stats = build_ray_dataset(paths, tok_dir, 64, window_rows=4, records_per_task=50, skip_bad_records=True)
    rows = ds.take_all()
    pad = tokenizer.pad_token_id
    got = sorted(s for r in rows for s in segments(r["input_ids"], r["seq_lens"], pad))
    expected_stream = open_stream(paths, tokenizer, 64, skip_bad_records=True)
    want = sorted(s for r in expected_stream for s in segments(r["input_ids"], r["seq_lens"], pad))
    assert got == want and len(got) == 200
    assert all(len(r["input_ids"]) == 64 and sum(r["seq_lens"]) == 64 for r in rows)
    again, _ = build_ray_dataset(paths, tok_dir, 64, window_rows=4, records_per_task=50, skip_bad_records=True)
    assert [list(r["input_ids"]) for r in again.take_all()] == [list(r["input_ids"]) for r in rows]  # same order
    st = ray_session.get(stats.get.remote())
    assert st["records"] == 201 and st["bad/invalid_json"] == 1 and st["examples"] == 200
    single, _ = build_ray_dataset(paths, tok_dir, 64, records_per_task=50, skip_bad_records=True, pack=False)
    single = single.take_all()  # data.pack: false - a row per example, the same segments
    assert (
        len(single) == 200 and sorted(s for r in single for s in segments(r["input_ids"], r["seq_lens"], pad)) == want
    )

    # Two workers' shards (what get_dataset_shard hands each worker) cover every row once; the
    # shards of a streaming split must be consumed concurrently, as Ray Train workers do.
    shards = ds.streaming_split(2, equal=False)
    ids: list[list[tuple]] = [[], []]

    def consume(k):
        for batch in iter_torch_batches(shards[k], batch_size=8):
            assert batch["input_ids"].shape[1] == 64 and batch["labels"].dtype == torch.int64
            assert (batch["seq_lens"].sum(1) == 64).all()
            ids[k].extend(tuple(x) for x in batch["input_ids"].tolist())

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(ids[0] + ids[1]) == sorted(tuple(np.asarray(r["input_ids"]).tolist()) for r in rows)


def test_strict_mode_fails_on_the_driver_before_training(ray_session, tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "a.jsonl", records(10), raw_lines=[(4, '{"prompt": "x"}')])
    with pytest.raises(DataError, match=r"a\.jsonl:5: missing field 'completion'"):
        build_ray_dataset(p, tokenizer, 64)


def _read_shard_loop(config):
    """Ray Train worker: read this worker's shard as torch batches and write what it saw to a file."""
    import json
    import os

    import ray.train

    from raytune_llm.packing.stream import iter_torch_batches

    rank = ray.train.get_context().get_world_rank()
    rows, tokens = 0, 0
    for batch in iter_torch_batches(ray.train.get_dataset_shard("train"), batch_size=4):
        rows += batch["input_ids"].shape[0]
        tokens += int((batch["labels"] != -100).sum())
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"rows": rows, "trainable": tokens}, f)
    ray.train.report({"rows": rows})


@pytest.mark.slow
def test_torch_trainer_workers_read_their_shards(ray_session, tmp_path, tokenizer):
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tok_dir = str(tmp_path / "tok")
    tokenizer.save_pretrained(tok_dir)
    p = write_jsonl(tmp_path / "a.jsonl", records(160))
    ds, _ = build_ray_dataset(p, tok_dir, 64, window_rows=4, records_per_task=40, num_cpus_per_task=0.5)
    n_rows = ds.count()
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        _read_shard_loop,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="shards"),
        datasets={"train": ds},
    )
    trainer.fit()
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert sum(s["rows"] for s in seen) == n_rows and all(s["rows"] > 0 for s in seen)
