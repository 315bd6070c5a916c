"""Packed vs unpacked training loss on a tiny LlamaForCausalLM (fp32, random weights, eager and sdpa).

The packed row runs with its position ids and an explicit block-diagonal causal 4D mask built from
seq_lens; the loss summed over the row must equal the per-example loss sums, one example at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytune_llm.packing.stream import batch_to_tensors, open_stream

from .conftest import write_jsonl


def block_causal_mask(seq_lens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive [1, 1, S, S] mask: 0 where query i may attend key j (same segment, j <= i), else -inf-ish."""
    seg = torch.repeat_interleave(torch.arange(len(seq_lens)), seq_lens)
    s = len(seg)
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    return torch.zeros(s, s, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE with HF's shift (logits[t] predicts labels[t + 1])."""
    return F.cross_entropy(logits[:-1].float(), labels[1:].long(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_unpacked_loss(tmp_path, tokenizer, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    recs = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: " + "fox " * (i % 5)},
                {"role": "assistant", "content": "The lazy dog" + " jumps" * (i % 4)},
            ]
        }
        for i in range(12)
    ]
    p = write_jsonl(tmp_path / "c.jsonl", recs)
    rows = list(open_stream(p, tokenizer, 96, window_rows=4, seed=0))
    assert any(len(r["seq_lens"]) >= 3 for r in rows)  # rows really hold several examples

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    model.config._attn_implementation = attn

    with torch.no_grad():
        for r in rows:
            b = batch_to_tensors([r])
            seq_lens = b["seq_lens"][0][b["seq_lens"][0] > 0]
            out = model(
                input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=block_causal_mask(seq_lens)
            ).logits[0]
            packed = loss_sum(out, b["labels"][0])
            unpacked, start = torch.zeros(()), 0
            for n in seq_lens.tolist():
                ids, labels = b["input_ids"][0, start : start + n], b["labels"][0, start : start + n]
                if (labels != -100).any():  # the padding segment has no loss
                    unpacked += loss_sum(model(input_ids=ids[None]).logits[0], labels)
                start += n
            torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-4)
            has_pad = int(b["input_ids"][0, -1]) == tokenizer.pad_token_id
            if len(seq_lens) - has_pad > 1:
                # The same row with a plain causal mask attends across examples: the loss must change.
                leaky = loss_sum(
                    model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0], b["labels"][0]
                )
                assert not torch.allclose(leaky, packed, rtol=1e-4)
