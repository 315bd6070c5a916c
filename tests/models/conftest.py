"""Shared helpers for the models/ tests: tiny checkpoints per family and twin (stock, fused) models."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models.tiny import FAMILIES, build_tiny_model

VOCAB = 256


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """One tiny random checkpoint per family, written once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: build_tiny_model(root / f, family=f, vocab_size=VOCAB, seed=0) for f in FAMILIES}


def sync_and_randomise_lora(ref: torch.nn.Module, ours: torch.nn.Module, seed: int = 0) -> None:
    """Copy every parameter of `ref` into `ours`, after giving lora_B random values.

    PEFT initialises B to zero, which makes the first steps' A-gradients zero and hides errors in them.
    """
    gen = torch.Generator().manual_seed(seed)
    ref_params = dict(ref.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert ref_params.keys() == ours_params.keys()
    with torch.no_grad():
        for name, p in ref_params.items():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            if p.requires_grad:
                ours_params[name].copy_(p)


def nf4_cuda_model(path, source: torch.nn.Module | None = None) -> torch.nn.Module:
    """The GPU tests' model: NF4 base, LoRA r=4 in bf16 on CUDA, its LoRA weights randomised
    (`sync_and_randomise_lora`), or copied from ``source`` (PEFT draws lora_A from the global RNG)."""
    from raytune_llm.models.load import load_model

    model = load_model(path, quantize="nf4", lora=dict(r=4, alpha=8), dtype=torch.bfloat16, device="cuda")
    sync_and_randomise_lora(source or model, model)
    return model


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the trainable (LoRA) parameters by name."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on the shared 2-core machine OpenMP threads spin against other processes'
    and made these tests ~5x slower; the models here are tiny, so one thread loses nothing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
