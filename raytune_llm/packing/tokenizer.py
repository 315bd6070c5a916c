"""Local tokenizer training and the default chat template.

`train_tokenizer` trains a byte-level BPE with the `tokenizers` library on texts we already
have (no hub access anywhere) and wraps it as a transformers `PreTrainedTokenizerFast`
with bos / eos / pad tokens and a ChatML-like chat template, saved with `save_pretrained`
so that any `AutoTokenizer.from_pretrained(out_dir)` loads it.

Byte-level BPE never produces an unknown token: every byte is in the initial alphabet, so
any UTF-8 input round-trips through encode/decode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# ChatML (Qwen / OpenAI style): every turn is "<|im_start|>{role}\n{content}<|im_end|>\n".
# It is prefix-stable: rendering messages[:i] is a prefix of rendering messages[:i+1], which
# formats.py relies on to find each assistant turn's characters without generation tags.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# 256 byte symbols are always in a byte-level vocabulary, plus our special tokens.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and save it as a transformers tokenizer.

    Args:
        texts: training texts (any iterable; consumed once).
        vocab_size: target vocabulary size including the 256 byte symbols and the special tokens.
        out_dir: folder written with `save_pretrained` (created if missing).

    Returns:
        The trained `PreTrainedTokenizerFast` with `bos_token`, `eos_token`, `pad_token` and
        `chat_template` set. Encoding with `add_special_tokens=True` prepends the bos token.

    Raises:
        ValueError: `vocab_size` is too small to hold the byte alphabet and the special tokens.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {_MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Like Llama: a plain `tokenizer(text)` starts with bos; offsets stay in characters of the input.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1_000_000,
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` the default ChatML-like template when it has none (in place).

    Args:
        tokenizer: any transformers tokenizer.

    Returns:
        The same tokenizer object.
    """
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer
