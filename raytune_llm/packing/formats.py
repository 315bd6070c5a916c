"""Record formats, rendering to text with trainable character spans, and tokenization with loss masks.

Formats (detected from the first valid record when format="auto"):

- "text":              {"text": str}; every token trains.
- "prompt_completion": {"prompt": str, "completion": str}; only the completion (and eos) trains.
- "alpaca":            {"instruction": str, "input": str (optional), "output": str}; rendered with
                       the Alpaca prompt; only the output (and eos) trains.
- "chat":              {"messages": [{"role", "content"}, ...]}; rendered with the tokenizer's chat
                       template (ChatML when it has none); only assistant turns train.

`train_on_prompt=True` makes every token train. Rendering gives one string and the character
spans that train; the whole string is tokenized at once (so BPE merges at the prompt/answer
seam are the ones inference sees) and a token trains when its first character lies in a span.
Chat spans come from rendering each prefix of the conversation: the template is prefix-stable
(ChatML, Llama 3, Mistral, Qwen 2.5 are), so render(messages[:i], add_generation_prompt=True)
ends where assistant turn i begins and render(messages[:i+1]) where it ends. This works with
any such template and needs no `{% generation %}` tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any, NamedTuple

import numpy as np

from .packer import IGNORE_INDEX, Example

FORMATS = ("text", "prompt_completion", "alpaca", "chat")
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class Rendered(NamedTuple):
    """A record as text: trainable character spans, and whether bos / eos tokens are added around it."""

    text: str
    spans: list[tuple[int, int]]
    add_bos: bool
    add_eos: bool


def detect_format(value: Any) -> str | None:
    """Guess the format of a parsed record from its keys, or None when it matches none.

    Returns:
        One of FORMATS, or None.
    """
    if not isinstance(value, dict):
        return None
    if "messages" in value:
        return "chat"
    if "prompt" in value and "completion" in value:
        return "prompt_completion"
    if "instruction" in value and "output" in value:
        return "alpaca"
    if "text" in value:
        return "text"
    return None


_FIELDS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}


def check_record(fmt: str, value: Any) -> tuple[str, str] | None:
    """Check one record's schema for a format.

    Args:
        fmt: one of FORMATS.
        value: the parsed record.

    Returns:
        None when valid, else (reason code, message) — e.g. ("missing_field", "missing field 'text'").

    Raises:
        ValueError: unknown format name.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected 'auto' or one of {', '.join(FORMATS)}")
    if not isinstance(value, dict):
        return "not_object", f"expected a JSON object, got {type(value).__name__}"
    if fmt == "chat":
        msgs = value.get("messages")
        if msgs is None:
            return "missing_field", "missing field 'messages'"
        if not isinstance(msgs, list) or not msgs:
            return "wrong_type", "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return "bad_message", f"messages[{i}] must be an object with 'role' and 'content'"
            if m["role"] not in ROLES:
                return "bad_role", f"messages[{i}].role={m['role']!r} is not one of {', '.join(ROLES)}"
            if not isinstance(m["content"], str):
                return "wrong_type", f"messages[{i}].content must be a string"
        return None
    for f in _FIELDS[fmt]:
        if f not in value or value[f] is None:
            return "missing_field", f"missing field {f!r}"
        if not isinstance(value[f], str):
            return "wrong_type", f"field {f!r} must be a string, got {type(value[f]).__name__}"
    if fmt == "alpaca" and value.get("input") is not None and not isinstance(value["input"], str):
        return "wrong_type", "field 'input' must be a string"
    return None


def render(fmt: str, value: dict, tokenizer, train_on_prompt: bool = False) -> Rendered:
    """Render a valid record (see `check_record`) to text and trainable character spans.

    Args:
        fmt: one of FORMATS.
        value: the record.
        tokenizer: a transformers tokenizer (its chat template is used for "chat").
        train_on_prompt: every character trains, not only completions / assistant turns.

    Returns:
        The `Rendered` record.

    Raises:
        ValueError: the chat template is not prefix-stable, so assistant turns cannot be located.
    """
    if fmt == "text":
        t = value["text"]
        return Rendered(t, [(0, len(t))], True, True)
    if fmt == "prompt_completion":
        prompt, answer = value["prompt"], value["completion"]
    elif fmt == "alpaca":
        inp = value.get("input") or ""
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if inp else "",
            instruction=value["instruction"],
            input_block=f"### Input:\n{inp}\n\n" if inp else "",
        )
        answer = value["output"]
    else:
        return _render_chat(value["messages"], tokenizer, train_on_prompt)
    text = prompt + answer
    return Rendered(text, [(0 if train_on_prompt else len(prompt), len(text))], True, True)


def _apply(tokenizer, messages, add_generation_prompt: bool) -> str:
    from .tokenizer import DEFAULT_CHAT_TEMPLATE  # here: packing.tokenizer imports transformers (validate needs none)

    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


_PROBE = "\x00raytune-llm-turn-content\x00"


def _render_chat(messages: list[dict], tokenizer, train_on_prompt: bool) -> Rendered:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _apply(tokenizer, msgs, False)
    if train_on_prompt:
        return Rendered(text, [(0, len(text))], False, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        upto = _apply(tokenizer, msgs[: i + 1], False)
        if i:
            head = _apply(tokenizer, msgs[:i], True)
        else:
            # Templates refuse an empty conversation: an opening assistant turn starts where its content does,
            # found through a stand-in content (the real one may also occur in the template's own tags, e.g. "end"
            # in <|im_end|>).
            probe = _apply(tokenizer, [{"role": "assistant", "content": _PROBE}], False)
            cut = probe.find(_PROBE)
            head = probe[:cut] if cut >= 0 else upto
        if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
            raise ValueError(
                "the tokenizer's chat template is not prefix-stable, so assistant turns cannot be located; "
                "set train_on_prompt or use a ChatML / Llama-3 style template"
            )
        spans.append((len(head), len(upto)))
    # Chat templates write their own bos / end-of-turn tokens.
    return Rendered(text, spans, False, False)


class Encoded(NamedTuple):
    """A tokenized chunk: one Example per record, and each one's count of trainable labels after its first token."""

    examples: list[Example]
    trainable: np.ndarray


def encode_chunk(tokenizer, rendered: Sequence[Rendered]) -> Encoded:
    """Tokenize rendered records in one batch (Rust, parallel) and build their loss masks, vectorised.

    Per-record Python work is kept to slicing: ids, offsets, masks and the bos / eos insertions are
    built for the whole chunk with numpy, which keeps tiny records at a few microseconds each.

    Args:
        tokenizer: a transformers fast tokenizer.
        rendered: records from `render`.

    Returns:
        `Encoded`: int32 input_ids and labels per record (IGNORE_INDEX outside the spans; bos never
        trains, eos trains when the last span reaches the end of the text; an empty text gives an
        empty example, without bos / eos) and the trainable-label counts.
    """
    n = len(rendered)
    if not n:
        return Encoded([], np.zeros(0, dtype=np.int64))
    encs = tokenizer.backend_tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    core = np.fromiter((len(e) for e in encs), dtype=np.int64, count=n)
    total = int(core.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=total)
    starts = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), np.int64, 2 * total)[::2]
    tok_rec = np.repeat(np.arange(n), core)
    train = np.zeros(total, dtype=bool)
    # One pass per span index (chat has one span per assistant turn; other formats one span).
    n_spans = max(len(r.spans) for r in rendered)
    for j in range(n_spans):
        lo = np.fromiter((r.spans[j][0] if j < len(r.spans) else 0 for r in rendered), np.int64, count=n)
        hi = np.fromiter((r.spans[j][1] if j < len(r.spans) else 0 for r in rendered), np.int64, count=n)
        train |= (starts >= lo[tok_rec]) & (starts < hi[tok_rec])
    has_bos = np.fromiter((r.add_bos for r in rendered), dtype=bool, count=n) & (core > 0) & (bos is not None)
    has_eos = np.fromiter((r.add_eos for r in rendered), dtype=bool, count=n) & (core > 0) & (eos is not None)
    eos_trains = np.fromiter((any(e >= len(r.text) for _, e in r.spans) for r in rendered), dtype=bool, count=n)
    length = core + has_bos + has_eos
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(length, out=bounds[1:])
    out_ids = np.empty(int(bounds[-1]), dtype=np.int32)
    out_lab = np.empty(int(bounds[-1]), dtype=np.int32)
    core_start = np.cumsum(core) - core
    dest = bounds[:-1][tok_rec] + has_bos[tok_rec] + (np.arange(total) - core_start[tok_rec])
    out_ids[dest] = ids
    out_lab[dest] = np.where(train, ids, IGNORE_INDEX)
    if has_bos.any():
        out_ids[bounds[:-1][has_bos]] = bos
        out_lab[bounds[:-1][has_bos]] = IGNORE_INDEX
    if has_eos.any():
        at = bounds[1:][has_eos] - 1
        out_ids[at] = eos
        out_lab[at] = np.where(eos_trains[has_eos], eos, IGNORE_INDEX)
    # Trainable labels after each example's first token (which the packer masks).
    counted = out_lab != IGNORE_INDEX
    counted[bounds[:-1][length > 0]] = False
    trainable = np.bincount(np.repeat(np.arange(n), length), weights=counted, minlength=n).astype(np.int64)
    b = bounds.tolist()
    examples = [Example(out_ids[b[i] : b[i + 1]], out_lab[b[i] : b[i + 1]]) for i in range(n)]
    return Encoded(examples, trainable)


def encode(tokenizer, rendered: Sequence[Rendered]) -> list[Example]:
    """Tokenize rendered records: `encode_chunk(...).examples`."""
    return encode_chunk(tokenizer, rendered).examples
