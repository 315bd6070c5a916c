"""Readers (JSONL, Parquet, HF folder, globs, ranges) and formats (detection, rendering, loss masks)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytune_llm.packing.formats import detect_format, encode, render
from raytune_llm.packing.packer import IGNORE_INDEX
from raytune_llm.packing.readers import count_records, expand_paths, iter_file, iter_records

from .conftest import write_jsonl

ROWS = [{"text": f"row {i}"} for i in range(7)]


def test_jsonl_lines_blank_lines_and_bad_json(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n{oops\n  \n{"text": "c"}\n{"text": "tab\tin a string"}\n')
    recs = list(iter_file(str(p)))
    assert [r.line for r in recs] == [1, 3, 4, 6, 7]
    assert recs[2].error.startswith("invalid JSON") and recs[2].where == f"{p}:4"
    assert recs[4].error == "invalid JSON (Invalid control character at column 14)"  # json's own "...at" not doubled
    assert [r.value["text"] for r in iter_file(str(p), 1, 4) if r.error is None] == ["b", "c"]
    assert count_records(str(p)) == 5


def test_a_record_cut_short_is_reported_at_its_end(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a"}\n{"text": "abc"\r\n{"text": "b"}\n')
    recs = list(iter_file(str(p)))
    assert recs[1].error == "invalid JSON (Expecting ',' delimiter at column 15)" and recs[1].where == f"{p}:2"
    assert [r.value for r in (recs[0], recs[2])] == [{"text": "a"}, {"text": "b"}]


def test_jsonl_bytes_the_reader_and_the_counter_agree_on(tmp_path):
    # Undecodable bytes are a bad record (not U+FFFD trained on); a lone "\r" does not split a record and a line of
    # non-breaking spaces is one (as count_records counts them: a resume skips by that count); a BOM is dropped.
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "bom"}\r\n{"text": "caf\xe9"}\n\xc2\xa0\n{"text": "a"}\r{"text": "b"}\n')
    recs = list(iter_file(str(p)))
    assert recs[0].value == {"text": "bom"}
    assert recs[1].error == "not valid UTF-8 (byte 14 of the line)"
    assert recs[2].error.startswith("invalid JSON") and recs[3].error.startswith("invalid JSON (Extra data")
    assert count_records(str(p)) == len(recs) == 4
    q = tmp_path / "b.jsonl"
    q.write_text('{"text": "c"}\n')
    assert [r.value for r in iter_records([str(p), str(q)], skip=4)] == [{"text": "c"}]


def test_parquet_hf_folder_glob_and_skip(tmp_path):
    import datasets

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "b.parquet", row_group_size=3)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    for path in (tmp_path / "b.parquet", tmp_path / "hf"):
        recs = list(iter_file(str(path), 2, 6))
        assert [r.value["text"] for r in recs] == [f"row {i}" for i in range(2, 6)]
        assert [r.line for r in recs] == [3, 4, 5, 6]
    files = expand_paths([str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet"), str(tmp_path / "hf")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "b.parquet", "hf"]
    assert [r.value["text"] for r in iter_records(files, skip=12)] == [f"row {i}" for i in range(5, 7)] + [
        f"row {i}" for i in range(7)
    ]


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        expand_paths(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data file type"):
        expand_paths(str(tmp_path / "x.csv"))


def test_detect_format():
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"prompt": "", "completion": ""}) == "prompt_completion"
    assert detect_format({"instruction": "", "input": "", "output": ""}) == "alpaca"
    assert detect_format({"text": ""}) == "text"
    assert detect_format({"foo": 1}) is None and detect_format([1]) is None


def _trained_text(tok, ex):
    ids = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    return tok.decode(ids)


def test_prompt_completion_masks_prompt(tokenizer):
    r = render("prompt_completion", {"prompt": "What is the capital?", "completion": " Paris."}, tokenizer)
    (ex,) = encode(tokenizer, [r])
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert _trained_text(tokenizer, ex) == " Paris." + tokenizer.eos_token
    np.testing.assert_array_equal(ex.labels[ex.labels != IGNORE_INDEX], ex.input_ids[ex.labels != IGNORE_INDEX])
    r_all = render("prompt_completion", {"prompt": "What?", "completion": " Paris."}, tokenizer, train_on_prompt=True)
    (ex_all,) = encode(tokenizer, [r_all])
    assert (ex_all.labels[1:] != IGNORE_INDEX).all()  # all but bos


def test_alpaca_and_text(tokenizer):
    rec = {"instruction": "Name a fox.", "input": "quick brown", "output": "The quick fox."}
    (ex,) = encode(tokenizer, [render("alpaca", rec, tokenizer)])
    assert _trained_text(tokenizer, ex) == "The quick fox." + tokenizer.eos_token
    assert "### Input:\nquick brown" in tokenizer.decode(ex.input_ids)
    (t,) = encode(tokenizer, [render("text", {"text": "Hello world"}, tokenizer)])
    assert tokenizer.decode(t.input_ids[1:-1]) == "Hello world" and (t.labels[1:] != IGNORE_INDEX).all()


def test_chat_trains_on_assistant_turns_only(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    (ex,) = encode(tokenizer, [render("chat", {"messages": msgs}, tokenizer)])
    assert _trained_text(tokenizer, ex) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(msgs, tokenize=False)


def test_chat_opening_with_an_assistant_turn_whose_text_is_in_the_template_tags(tokenizer):
    # "end" also occurs in <|im_end|>: the turn still trains on all of its content and the end-of-turn tag.
    msgs = [{"role": "assistant", "content": "end"}]
    (ex,) = encode(tokenizer, [render("chat", {"messages": msgs}, tokenizer)])
    assert _trained_text(tokenizer, ex) == "end<|im_end|>\n"


def test_chat_with_a_llama3_style_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    msgs = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello world!"}]
    (ex,) = encode(tok, [render("chat", {"messages": msgs}, tok)])
    assert _trained_text(tok, ex) == "Hello world!<|eot_id|>"
    assert ex.input_ids[0] == tok.bos_token_id


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.text(min_size=1, max_size=40),
    completion=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
)
def test_mask_covers_exactly_the_completion(tokenizer, prompt, completion):
    # A seam token (one starting in the prompt and running into the completion) stays prompt: the
    # trained tokens decode to a suffix of the completion, and all of it when the seam is clean.
    (ex,) = encode(tokenizer, [render("prompt_completion", {"prompt": prompt, "completion": completion}, tokenizer)])
    trained = _trained_text(tokenizer, ex)
    assert trained.endswith(tokenizer.eos_token)
    body = trained[: -len(tokenizer.eos_token)]
    assert completion.endswith(body)
    assert tokenizer.decode(ex.input_ids[1:-1]) == prompt + completion  # nothing lost in tokenization
