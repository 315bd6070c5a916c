"""train_tokenizer: round trip, special tokens, chat template, reload through AutoTokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from raytune_llm.packing.tokenizer import DEFAULT_CHAT_TEMPLATE, IM_END, train_tokenizer


def test_roundtrip_and_special_tokens(tokenizer, tmp_path):
    text = "Hello world — naïve café, 東京! \n\t tabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: any UTF-8 round-trips
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE


def test_saved_folder_reloads_with_chat_template(tmp_path):
    tok = train_tokenizer(["a b c d e f g"] * 20, 300, tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = again.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    ids = again(text, add_special_tokens=False)["input_ids"]
    assert again.convert_tokens_to_ids(IM_END) in ids and again.unk_token_id not in ids
    assert again.get_vocab() == tok.get_vocab()


def test_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], 100, tmp_path)
