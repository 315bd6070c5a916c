"""Fused path vs transformers + PEFT (+ bitsandbytes): 20 AdamW steps, fp32, every step within 1e-5.

Runs on whatever kernels dispatch to: the references on a plain CPU, the Triton kernels under
`TRITON_INTERPRET=1` (see test_fidelity_interpreted) or on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from raytune_llm.models.load import load_model
from raytune_llm.models.tiny import FAMILIES
from tests.models.conftest import VOCAB, lora_grads, sync_and_randomise_lora

# 20 steps on the torch references; the interpreted run (test_fidelity_interpreted_triton) takes 2, a plain and a
# packed batch: under TRITON_INTERPRET=1 each step of the tiny model costs seconds (the kernels are in tests/kernels).
STEPS = int(os.environ.get("RAYTUNE_LLM_FIDELITY_STEPS", "20"))
TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    batch = {"input_ids": ids, "labels": labels}
    if step % 2:
        # Every other step a packed batch: rows of 3 examples whose positions restart at 0. HF's SDPA
        # path detects the restarts and masks across examples, so both sides must agree here too.
        pos = torch.cat([torch.arange(10), torch.arange(8), torch.arange(6)])
        batch["position_ids"] = pos[None].expand(2, -1).contiguous()
        labels[:, [10, 18]] = -100
    return batch


def run_fidelity(path, quantize: str | None, steps: int = STEPS) -> None:
    lora = dict(r=4, alpha=8)
    ref = load_model(path, quantize=quantize, lora=lora, dtype=torch.float32, device="cpu", fused=False)
    ours = load_model(path, quantize=quantize, lora=lora, dtype=torch.float32, device="cpu")
    assert ours.raytune_patch_report.stock == {}, str(ours.raytune_patch_report)
    sync_and_randomise_lora(ref, ours)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = _batch(gen, step)
        loss_ref = ref(**batch).loss
        out = ours(**batch)
        assert out.logits is None  # the fused loss never materialises logits
        torch.testing.assert_close(out.loss, loss_ref, **TOL, msg=lambda m, step=step: f"step {step} loss: {m}")
        loss_ref.backward()
        out.loss.backward()
        g_ref, g_ours = lora_grads(ref), lora_grads(ours)
        for name in g_ref:
            torch.testing.assert_close(
                g_ours[name], g_ref[name], **TOL, msg=lambda m, step=step, name=name: f"step {step} {name}: {m}"
            )
        for opt in (opt_ref, opt_ours):
            opt.step()
            opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_steps_match_peft(tiny_paths, family):
    run_fidelity(tiny_paths[family], quantize=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_steps_match_peft_bitsandbytes_nf4(tiny_paths, family):
    run_fidelity(tiny_paths[family], quantize="nf4")


@pytest.mark.slow
def test_fidelity_interpreted_triton():
    """The same fidelity run with the Triton kernels under TRITON_INTERPRET=1 (a fresh interpreter:
    the variable must be set before triton is imported)."""
    import subprocess
    import sys

    # One OpenMP thread: torch runs on one already (conftest's autouse fixture); this pins numpy's OpenBLAS too, whose
    # products (the interpreter's tl.dot) have other bits at 1 and 2 threads, so the check does not depend on the
    # machine's core count. (Session 21's one failure, 1.098e-5 against 1e-5, has no known cause.)
    env = {**os.environ, "TRITON_INTERPRET": "1", "RAYTUNE_LLM_FIDELITY_STEPS": "2", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"{__file__}",
        "-k",
        "llama",
        "-m",
        "not slow",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
