"""GGUF export read back by llama.cpp: logits close to transformers' on the merged model, same greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytune_llm.export import export

from .conftest import build_base, build_run

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see Makefile test set-up)")

PROMPT = [0, 5, 17, 40, 99, 123, 200, 7]


def _hf_logits_and_greedy(folder, steps):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
        gen = model.generate(torch.tensor([PROMPT]), max_new_tokens=steps, do_sample=False, pad_token_id=2)
    return logits, gen[0, len(PROMPT) :].tolist()


def _gguf_logits_and_greedy(path, steps):
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False, seed=0)
    try:
        llm.eval(PROMPT)
        logits = np.array(llm.scores[: len(PROMPT)])
        llm.reset()
        out = []
        for tok in llm.generate(PROMPT, top_k=1, temp=0.0, reset=True):
            out.append(tok)
            if len(out) == steps:
                break
    finally:
        llm.close()
    return logits, out


@pytest.mark.parametrize(
    "family,over,gguf_type,tol",
    [
        ("llama", {}, "f16", 2e-2),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
            "bf16",
            1e-1,
        ),
        ("mistral", {}, "q8_0", 1e-1),
        ("qwen2", {}, "f16", 2e-2),
        ("llama", {"attention_bias": True}, "f16", 2e-2),
    ],
    ids=["llama-f16", "llama3rope-bf16", "mistral-q8_0", "qwen2-f16", "llama-attention-bias-f16"],
)
def test_gguf_matches_transformers(tmp_path, family, over, gguf_type, tol):
    base = build_base(tmp_path / "base", family, **over)
    run = build_run(tmp_path / "run", base)
    hf = export(run, "hf", dtype="fp32")
    path = export(run, "gguf", gguf_type=gguf_type)
    assert path == run / "exports" / "gguf" / f"model-{gguf_type}.gguf" and path.is_file()
    want, want_tokens = _hf_logits_and_greedy(hf, steps=5)
    got, got_tokens = _gguf_logits_and_greedy(path, steps=5)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, f"{family} {gguf_type}: max logit error {err:.3g} of the logit range"
    assert got_tokens == want_tokens
    if "rope_parameters" in over:  # Llama 3 RoPE scaling travels as llama.cpp's per-frequency factor tensor
        import gguf

        factors = {t.name: t for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"].data
        assert factors.shape == (8,) and factors.min() == 1.0 and factors.max() == 8.0
