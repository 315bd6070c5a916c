"""`kernels.lora_swiglu_grad`: the LoRA SwiGLU backward and its six rank-r products in one pass, against the
backward kernel followed by three `lora_pair` calls (what it replaces) and against fp64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raytune_llm.kernels import lora_swiglu_grad as mod
from tests.kernels._tolerance import kernel_device, needs_triton

# (lean, finish_up): a lean recompute (G and U the base outputs), the gate kept (U alone to finish), both finished
CASES = [(True, False), (False, True), (False, False)]


def _inputs(n, inter, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    rd, rg, ru = ranks

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(kernel_device(), torch.bfloat16)

    dH, G, U = t(n, inter), t(n, inter), t(n, inter)
    dYB, Ad = t(n, rd), t(rd, inter, scale=0.2)
    XA, Bg, Bu = t(n, rg + ru), t(inter, rg, scale=0.2), t(inter, ru, scale=0.2)
    return dH, G, U, dYB, Ad, XA, Bg, Bu


def _run(fused, monkeypatch, inputs, ranks, lean, finish_up, need):
    dH, G, U, dYB, Ad, XA, Bg, Bu = [x.clone() for x in inputs]
    called = []
    real = mod.lora_swiglu_grad
    monkeypatch.setattr(mod, "_FUSED", [fused])
    monkeypatch.setattr(mod, "lora_swiglu_grad", lambda *a: called.append(1) or real(*a))
    dtypes = [torch.float32] * 6
    out = mod.swiglu_backward_products(
        dH, G, U, dYB, Ad, XA, list(ranks[1:]), Bg, Bu, (2.0, 0.5), lean, finish_up, need, dtypes
    )
    assert bool(called) == fused
    return (G, U, *out)


@needs_triton
@pytest.mark.parametrize("lean,finish_up", CASES, ids=["lean", "gate_kept", "finished"])
@pytest.mark.parametrize(
    "n,inter,ranks,span",
    [(70, 300, (4, 4, 4), 1), (33, 64, (16, 3, 5), 1), (150, 300, (4, 4, 4), 2)],
    ids=["tiles", "ranks", "spans"],
)
def test_fused_gives_the_unfused_bits(monkeypatch, lean, finish_up, n, inter, ranks, span):
    # Several row spans and column blocks with partial tiles on both axes (and ranks that differ): dG, dU and every
    # product bit for bit what the backward kernel and three lora_pair calls give; H A_d^T only in a lean recompute.
    # "spans": each program walks two row tiles (at these sizes the span is one tile unless told), in both kernels.
    if span > 1:
        rows = lambda n_rows, n_col_blocks, bn: span * bn  # noqa: E731
        monkeypatch.setattr(mod, "_rows_per_program", rows)
        monkeypatch.setattr(mod.pair_mod, "_rows_per_program", rows)
    inputs = _inputs(n, inter, ranks)
    need = [True] * 6
    fused = _run(True, monkeypatch, inputs, ranks, lean, finish_up, need)
    unfused = _run(False, monkeypatch, inputs, ranks, lean, finish_up, need)
    names = ["dG", "dU", "H A_d^T", "H^T dYB", "dG B_g", "dG^T xa_g", "dU B_u", "dU^T xa_u"]
    for name, a, b in zip(names, fused, unfused):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (fused[2] is not None) == lean


@needs_triton
@pytest.mark.parametrize("store_gu", [True, False], ids=["store_gu", "h_only"])
@pytest.mark.parametrize("n,inter,ranks", [(70, 300, (4, 4, 4)), (150, 300, (16, 3, 5))], ids=["tiles", "ranks"])
def test_fused_forward_gives_the_unfused_bits(monkeypatch, store_gu, n, inter, ranks):
    # The forward kernel with H A_d^T from the same pass: H, the finished (or untouched) G and U, and H A_d^T bit
    # for bit what lora_swiglu_forward and a lora_pair call give.
    _, G0, U0, _, Ad, XA, Bg, Bu = _inputs(n, inter, ranks, seed=4)
    xa_g, xa_u = XA[:, : ranks[1]], XA[:, ranks[1] :]
    got = {}
    for fused in (True, False):
        monkeypatch.setattr(mod, "_FUSED", [fused])
        G, U = G0.clone(), U0.clone()
        H, HA = mod.swiglu_forward_products(G, U, xa_g, xa_u, Bg, Bu, Ad.contiguous(), 2.0, 0.5, store_gu)
        got[fused] = (H, HA, G, U)
    for name, a, b in zip(["H", "H A_d^T", "G", "U"], got[True], got[False]):
        assert torch.equal(a, b), name
    assert torch.equal(got[True][2], G0) != store_gu


@needs_triton
def test_products_left_out_are_not_formed_and_the_rest_keep_their_bits(monkeypatch):
    # Frozen adapters (no dA_d, dB_g, dB_u wanted): those products come back None, the others with the bits of the
    # call that forms all of them.
    ranks = (4, 4, 4)
    inputs = _inputs(70, 300, ranks, seed=1)
    every = _run(True, monkeypatch, inputs, ranks, True, False, [True] * 6)
    some = _run(True, monkeypatch, inputs, ranks, True, False, [True, False, True, False, False, True])
    for i, (a, b) in enumerate(zip(some, every)):
        assert a is None if i in (3, 5, 7) else torch.equal(a, b), i


@needs_triton
def test_fused_matches_fp64():
    # The math itself: finish G and U (lean), dH's rank update, SwiGLU's derivative, the six products, in fp64 on the
    # same bf16 inputs; each result within a few bf16 roundings.
    n, inter, r = 70, 300, 4
    dH, G, U, dYB, Ad, XA, Bg, Bu = _inputs(n, inter, (r, r, r), seed=2)
    xa_g, xa_u = XA[:, :r], XA[:, r:]
    d = [x.double() for x in (dH, G, U, dYB, Ad, xa_g, xa_u, Bg, Bu)]
    dh, g, u = d[0] + d[3] @ d[4], d[1] + 2.0 * d[5] @ d[7].t(), d[2] + 0.5 * d[6] @ d[8].t()
    sg = torch.sigmoid(g)
    h, dg, du = g * sg * u, dh * u * sg * (1 + g * (1 - sg)), dh * g * sg
    want = [h @ d[4].t(), h.t() @ d[3], dg @ d[7], dg.t() @ d[5], du @ d[8], du.t() @ d[6]]
    out = mod.lora_swiglu_grad(
        dH, G, U, dYB, Ad, xa_g, xa_u, Bg, Bu, 2.0, 0.5, True, True, [True] * 6, [torch.float32] * 3
    )
    for ref, got in zip([dg, du], [G, U]):
        torch.testing.assert_close(got.double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())
    for ref, got in zip(want, out):
        torch.testing.assert_close(got.double(), ref, rtol=2**-6, atol=2**-6 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("lean,finish_up", CASES, ids=["lean", "gate_kept", "finished"])
def test_fused_gives_the_unfused_bits_at_llama_shapes_on_the_gpu(monkeypatch, lean, finish_up):
    # 4,096 rows of Llama-3.1-8B's MLP at rank 16, on the GPU's own tiles (each program walks many row tiles): dG,
    # dU and the [N, r] products bit for bit (a lean layer's H A_d^T must be a kept layer's); the [I, r] ones, summed
    # 16 rows a dot instead of lora_pair's 32, within fp32 accumulation error of them.
    ranks = (16, 16, 16)
    inputs = [t.cuda() for t in _inputs(4096, 14336, ranks, seed=3)]
    fused = _run(True, monkeypatch, inputs, ranks, lean, finish_up, [True] * 6)
    unfused = _run(False, monkeypatch, inputs, ranks, lean, finish_up, [True] * 6)
    names = ["dG", "dU", "H A_d^T", "H^T dYB", "dG B_g", "dG^T xa_g", "dU B_u", "dU^T xa_u"]
    exact = [name for name, a, b in zip(names, fused, unfused) if a is not None and torch.equal(a, b)]
    assert {"dG", "dU", "dG B_g", "dU B_u"} | ({"H A_d^T"} if lean else set()) <= set(exact), exact
    for name, a, b in zip(names, fused, unfused):
        if a is not None and name.endswith(("dYB", "xa_g", "xa_u")):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


def test_the_default_tile_compiles_for_the_h200_without_spilling_kilobytes():
    # Compiled for sm_90 here (no GPU: Triton's own ptxas and cuobjdump), in a process without the interpreter.
    # Session 21's first tiles held each rank update whole in every warp and spilled ~3 KB a thread; the default
    # tile, transposed, spills 32-48 B.
    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parents[2] / "bench" / "kernels" / "spills.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--max-stack", "128"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("store_gu", [True, False], ids=["store_gu", "h_only"])
def test_fused_forward_gives_the_unfused_bits_at_llama_shapes_on_the_gpu(monkeypatch, store_gu):
    # 4,096 rows of Llama-3.1-8B's MLP at rank 16 on the GPU's tiles: H, G, U and H A_d^T bit for bit (the down
    # projection and a lean recompute's backward read them).
    _, G0, U0, _, Ad, XA, Bg, Bu = [t.cuda() for t in _inputs(4096, 14336, (16, 16, 16), seed=5)]
    got = {}
    for fused in (True, False):
        monkeypatch.setattr(mod, "_FUSED", [fused])
        G, U = G0.clone(), U0.clone()
        H, HA = mod.swiglu_forward_products(G, U, XA[:, :16], XA[:, 16:], Bg, Bu, Ad.contiguous(), 2.0, 0.5, store_gu)
        got[fused] = (H, HA, G, U)
    differ = [n for n, a, b in zip(["H", "H A_d^T", "G", "U"], got[True], got[False]) if not torch.equal(a, b)]
    assert not differ, f"fused differs from unfused in {differ}"
