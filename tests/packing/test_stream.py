"""open_stream and validate_data: bad-record policy, drops and over-long counts, exact resume with stats."""

from __future__ import annotations

import json

import pytest

from raytune_llm.packing.packer import IGNORE_INDEX
from raytune_llm.packing.stream import batch_to_tensors, open_stream
from raytune_llm.packing.validate import DataError, validate_data

from .conftest import write_jsonl


def pc(i, n=3):
    return {"prompt": f"Question {i}: " + "fox " * n, "completion": " Answer: dog" + " lazy" * (i % 7)}


def test_strict_mode_fails_with_file_line_reason(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [pc(i) for i in range(20)], raw_lines=[(5, '{"prompt": "x"}')])
    with pytest.raises(DataError) as e:
        validate_data(p)
    assert str(e.value).startswith(f"{p}:6: missing field 'completion'") and "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"d\.jsonl:6: missing field 'completion'"):
        list(open_stream(p, tokenizer, 64))


def test_skip_counts_by_reason_and_aborts_over_the_limit(tmp_path, tokenizer):
    bad = [(3, "{nope"), (10, '{"prompt": 1, "completion": "x"}'), (20, "[1, 2]")]
    p = write_jsonl(tmp_path / "d.jsonl", [pc(i) for i in range(2000)], raw_lines=bad)
    s = open_stream(p, tokenizer, 128, skip_bad_records=True)
    rows = list(s)
    st = s.stats
    assert st["records"] == 2003 and st["bad_records"] == 3 and st["examples"] == 2000
    assert (st["bad/invalid_json"], st["bad/wrong_type"], st["bad/not_object"]) == (1, 1, 1)
    assert s.first_bad[0].startswith(f"{p}:4: invalid JSON") and len(s.first_bad) == 3
    assert sum(int((r["input_ids"] != tokenizer.pad_token_id).sum()) for r in rows) == st["tokens"]
    v = validate_data(p, skip_bad_records=True)
    assert v["bad_records"] == 3 and v["format/prompt_completion"] == 1
    with pytest.raises(DataError, match=r"3 of 2003 records are bad .* first: .*d\.jsonl:4: invalid JSON"):
        validate_data(p, skip_bad_records=True, max_bad_fraction=0.001)
    with pytest.raises(DataError, match="records are bad"):
        list(open_stream(p, tokenizer, 128, skip_bad_records=True, max_bad_fraction=0.001))


def test_empty_and_untrainable_never_reach_the_model(tmp_path, tokenizer):
    recs = [{"text": "fox dog"}, {"text": ""}, {"text": "x"}, {"text": "lazy dog jumps"}]
    p = write_jsonl(tmp_path / "t.jsonl", recs)
    s = open_stream(p, tokenizer, 32)
    rows = list(s)
    assert s.stats["dropped_empty"] == 1 and s.stats["examples"] == 3  # "x" still trains its eos
    chat = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "assistant", "content": "ok"}]}]
    s = open_stream(write_jsonl(tmp_path / "c.jsonl", chat), tokenizer, 32)
    rows = list(s)
    assert s.stats["dropped_no_trainable"] == 1 and s.stats["examples"] == 1
    assert all((r["labels"] != IGNORE_INDEX).any() for r in rows)


@pytest.mark.parametrize(
    "overlong,key,examples",
    [("truncate", "overlong_truncated", 3), ("drop", "overlong_dropped", 2), ("split", "overlong_split", None)],
)
def test_overlong_policies_are_counted(tmp_path, tokenizer, overlong, key, examples):
    long_text = "the quick brown fox jumps over the lazy dog " * 12
    p = write_jsonl(tmp_path / "o.jsonl", [{"text": "fox"}, {"text": long_text}, {"text": "dog"}])
    if overlong == "split":  # bos + tokens + eos, cut into pieces of 16
        examples = 2 + -(-(len(tokenizer(long_text, add_special_tokens=False)["input_ids"]) + 2) // 16)
    s = open_stream(p, tokenizer, 16, overlong=overlong)
    rows = list(s)
    assert s.stats[key] == 1 and s.stats["examples"] == examples, s.stats
    assert all(len(r["input_ids"]) == 16 for r in rows)


def test_resume_exact_rows_and_stats_over_files(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [pc(i, i % 9) for i in range(150)], raw_lines=[(40, "{bad")])
    write_jsonl(tmp_path / "b.jsonl", [pc(i, i % 5) for i in range(150, 300)])
    opts = dict(window_rows=4, seed=1, skip_bad_records=True)
    full_stream = open_stream(str(tmp_path / "*.jsonl"), tokenizer, 64, **opts)
    full = [r["input_ids"] for r in full_stream]
    for stop in (3, len(full) // 2, len(full) - 2):
        s1 = open_stream(str(tmp_path / "*.jsonl"), tokenizer, 64, **opts)
        it = iter(s1)
        head = [next(it)["input_ids"] for _ in range(stop)]
        state = json.loads(json.dumps(s1.state_dict()))
        s2 = open_stream(str(tmp_path / "*.jsonl"), tokenizer, 64, **opts)
        s2.load_state_dict(state)
        tail = [r["input_ids"] for r in s2]
        assert len(head) + len(tail) == len(full) and all((x == y).all() for x, y in zip(head + tail, full))
        assert s2.stats == full_stream.stats


def test_batch_to_tensors(tmp_path, tokenizer):
    import torch

    p = write_jsonl(tmp_path / "d.jsonl", [pc(i) for i in range(30)])
    rows = list(open_stream(p, tokenizer, 64))[:4]
    b = batch_to_tensors(rows)
    assert b["input_ids"].shape == (4, 64) and b["input_ids"].dtype == torch.int64
    assert (b["seq_lens"].sum(1) == 64).all()


def test_bad_options(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [pc(0)])
    with pytest.raises(ValueError, match="format='csv'"):
        open_stream(p, tokenizer, 64, format="csv")
    with pytest.raises(ValueError, match="overlong='cut'"):
        open_stream(p, tokenizer, 64, overlong="cut")


def test_unpacked_rows_hold_one_example_each(tmp_path, tokenizer):
    # data.pack: false - every example in a row of its own, padded; the same tokens as the packed rows.
    recs = [{"prompt": f"question {i} " * (1 + i % 4), "completion": f"answer {i}"} for i in range(30)]
    p = write_jsonl(tmp_path / "a.jsonl", recs)
    packed = list(open_stream(p, tokenizer, 64))
    single = list(open_stream(p, tokenizer, 64, pack=False))
    assert len(single) == len(recs) > len(packed)
    # one example, then the padding segment (rows are padded to seq_len)
    assert all(len(r["seq_lens"]) <= 2 and int(r["seq_lens"].sum()) == 64 for r in single)
    trained = lambda rows: sorted(int(x) for r in rows for x in r["labels"] if x != IGNORE_INDEX)  # noqa: E731
    assert trained(single) == trained(packed)
