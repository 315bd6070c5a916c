"""Tiny real checkpoints for the export tests: a trained byte-level BPE tokenizer, a random HF model saved with
save_pretrained, and a PEFT adapter (random A and B, so the update is not zero) in a run-folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Export merges the adapter into the base model and writes safetensors shards.",
    "llama.cpp reads GGUF files; vLLM reads safetensors and PEFT adapters.",
    "Numbers 0123456789 and punctuation: ,.;!?()[]{} keep the byte-level alphabet busy.",
] * 20
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"


def train_tokenizer(folder: Path, vocab_size: int = 320):
    """Train a ByteLevel BPE tokenizer and save it as a transformers fast tokenizer into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def model_config(family: str, vocab: int, **over):
    """A small config llama.cpp accepts (hidden 64, head_dim 16) with peaked random weights."""
    from transformers import AutoConfig

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    kw.update(over)
    return AutoConfig.for_model(family, **kw)


def build_base(folder: Path, family: str = "llama", seed: int = 0, max_shard_size: str | None = None, **over) -> Path:
    """Save a random fp32 model (random biases too) + tokenizer into ``folder``."""
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, len(tok), **over), dtype=torch.float32)
    with torch.no_grad():  # transformers starts biases at zero, which would let any handling of them pass
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    return folder


def load_base(base: Path, bits: int = 16):
    """Load the base in fp32 (bits=16) or through bitsandbytes NF4 with fp32 compute (bits=4)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if bits == 4:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kw).eval()
    if bits == 4:  # exact NF4 in eval mode on AVX512-BF16 CPUs too (see models.quantize.keep_nf4_layout)
        from raytune_llm.models.quantize import keep_nf4_layout

        keep_nf4_layout(model)
    return model


def build_run(run: Path, base: Path, bits: int = 16, seed: int = 1, **lora_kw) -> Path:
    """Write a run folder: config.yaml, adapter/ (PEFT save_pretrained, random A and B) and raytune_llm.json."""
    from peft import LoraConfig, get_peft_model

    model = load_base(base, bits)
    torch.manual_seed(seed)
    kw = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    kw.update(lora_kw)
    peft_model = get_peft_model(model, LoraConfig(**kw))
    run.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(f"model:\n  path: {base}\nquant:\n  bits: {bits}\nlora:\n  r: {kw['r']}\n")
    if bits == 4:
        meta = {"quant_bits": 4, "quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32"}
        (run / "adapter" / "raytune_llm.json").write_text(json.dumps(meta))
    return run


def adapter_model(run: Path, base: Path, bits: int = 16):
    """The reference: PEFT's unmerged model on the (quantized) base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base, bits), run / "adapter").eval()


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("llama_base"), "llama")
