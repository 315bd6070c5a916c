"""`kernels.lora_swiglu_grad`: the LoRA SwiGLU kernels with the adapters' products of H, dG and dU in the same pass,
against the unfused kernels followed by `lora_pair` (what they replace), against fp64, and the property training
relies on: a lean recompute's backward gives a kept layer's bits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raytune_llm.kernels import lora_swiglu_grad as mod
from tests.kernels._tolerance import INTERPRET, kernel_device, needs_triton

# (lean, finish_up): a lean recompute (G and U the base outputs), the gate kept (U alone to finish), both finished
CASES = [(True, False), (False, True), (False, False)]
NAMES = ["dG", "dU", "H A_d^T", "H^T dYB", "dG B_g", "dG^T xa_g", "dU B_u", "dU^T xa_u"]


@pytest.fixture
def order_free_dot(monkeypatch):
    """The interpreter's tl.dot summed in fp64 and rounded once: its result no longer depends on the order numpy sums
    in, which changes with the operands' shapes and sides (the fused kernels hold their tiles transposed), so
    fused and unfused must agree exactly."""
    if not INTERPRET:
        pytest.skip("replaces the Triton interpreter's dot")
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        prod = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)).astype(d.data.dtype)
        return interpreter.TensorHandle(prod + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _inputs(n, inter, ranks, seed=0, dtype=torch.bfloat16, device=None):
    g = torch.Generator().manual_seed(seed)
    rd, rg, ru = ranks

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device or kernel_device(), dtype)

    dH, G, U = t(n, inter), t(n, inter), t(n, inter)
    dYB, Ad = t(n, rd), t(rd, inter, scale=0.2)
    XA, Bg, Bu = t(n, rg + ru), t(inter, rg, scale=0.2), t(inter, ru, scale=0.2)
    return dH, G, U, dYB, Ad, XA, Bg, Bu


def _backward(fused, monkeypatch, inputs, ranks, lean, finish_up, need=(True,) * 6):
    dH, G, U, dYB, Ad, XA, Bg, Bu = [x.clone() for x in inputs]
    called = []
    real = mod.lora_swiglu_grad
    monkeypatch.setattr(mod, "_FUSED", [fused])
    monkeypatch.setattr(mod, "lora_swiglu_grad", lambda *a: called.append(1) or real(*a))
    out = mod.swiglu_backward_products(
        dH, G, U, dYB, Ad, XA, list(ranks[1:]), Bg, Bu, (2.0, 0.5), lean, finish_up, list(need), [torch.float32] * 6
    )
    assert bool(called) == (fused and max(ranks) <= 16)
    return (G, U, *out)


def _forward(fused, monkeypatch, inputs, ranks, store_gu):
    _, G, U, _, Ad, XA, Bg, Bu = [x.clone() for x in inputs]
    monkeypatch.setattr(mod, "_FUSED", [fused])
    xa_g, xa_u = XA[:, : ranks[1]], XA[:, ranks[1] :]
    H, HA = mod.swiglu_forward_products(G, U, xa_g, xa_u, Bg, Bu, Ad.contiguous(), 2.0, 0.5, store_gu)
    return H, HA, G, U


def _spans(monkeypatch, span):
    # each program walks `span` row tiles (at these sizes one unless told), in the fused kernels and lora_pair alike
    if span > 1:
        rows = lambda n_rows, n_col_blocks, bn: span * bn  # noqa: E731
        monkeypatch.setattr(mod, "_rows_per_program", rows)
        monkeypatch.setattr(mod.pair_mod, "_rows_per_program", rows)


def _assert_same(got, want, names):
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name


SHAPES = [(70, 300, (4, 4, 4), 1), (33, 64, (16, 3, 5), 1), (150, 300, (4, 16, 8), 2)]


@needs_triton
@pytest.mark.parametrize("lean,finish_up", CASES, ids=["lean", "gate_kept", "finished"])
@pytest.mark.parametrize("n,inter,ranks,span", SHAPES, ids=["tiles", "ranks", "spans"])
@pytest.mark.parametrize(
    "dtype,seed", [(torch.bfloat16, 0), (torch.bfloat16, 1), (torch.float16, 0)], ids=["bf16", "bf16s1", "fp16"]
)
def test_fused_backward_gives_the_unfused_values(
    order_free_dot, monkeypatch, lean, finish_up, n, inter, ranks, span, dtype, seed
):
    # Several row spans and column blocks with partial tiles on both axes, ranks that differ: dG, dU and every
    # product bit for bit what the backward kernel and three lora_pair calls give, once the dots sum in no order;
    # H A_d^T only in a lean recompute.
    _spans(monkeypatch, span)
    inputs = _inputs(n, inter, ranks, seed=seed, dtype=dtype)
    fused = _backward(True, monkeypatch, inputs, ranks, lean, finish_up)
    _assert_same(fused, _backward(False, monkeypatch, inputs, ranks, lean, finish_up), NAMES)
    assert (fused[2] is not None) == lean


@needs_triton
@pytest.mark.parametrize("store_gu", [True, False], ids=["store_gu", "h_only"])
@pytest.mark.parametrize("n,inter,ranks,span", SHAPES, ids=["tiles", "ranks", "spans"])
@pytest.mark.parametrize("seed", [0])
def test_fused_forward_gives_the_unfused_values(order_free_dot, monkeypatch, store_gu, n, inter, ranks, span, seed):
    # H, the finished (or untouched) G and U, and H A_d^T: what lora_swiglu_forward and a lora_pair call give.
    _spans(monkeypatch, span)
    inputs = _inputs(n, inter, ranks, seed=seed)
    fused = _forward(True, monkeypatch, inputs, ranks, store_gu)
    _assert_same(fused, _forward(False, monkeypatch, inputs, ranks, store_gu), ["H", "H A_d^T", "G", "U"])
    assert torch.equal(fused[2], inputs[1]) != store_gu


@needs_triton
@pytest.mark.parametrize("n,inter,ranks,span", SHAPES, ids=["tiles", "ranks", "spans"])
def test_a_lean_recompute_gives_a_kept_layers_bits(monkeypatch, n, inter, ranks, span):
    # With the dot as it is (interpreter or GPU): a layer whose forward kept G, U and H A_d^T, one that kept the gate
    # alone (U finished in backward) and a lean recompute (both finished in backward, H A_d^T formed there) give the
    # same dG, dU and gradient products; the lean one's H A_d^T is the forward's.
    _spans(monkeypatch, span)
    _assert_lean_is_kept(monkeypatch, _inputs(n, inter, ranks, seed=7), ranks)


def _assert_lean_is_kept(monkeypatch, inputs, ranks):
    dH, G0, U0, dYB, Ad, XA, Bg, Bu = inputs
    _, HA, G, U = _forward(True, monkeypatch, inputs, ranks, True)
    kept = _backward(True, monkeypatch, (dH, G, U, dYB, Ad, XA, Bg, Bu), ranks, False, False)
    gate = _backward(True, monkeypatch, (dH, G, U0, dYB, Ad, XA, Bg, Bu), ranks, False, True)
    lean = _backward(True, monkeypatch, inputs, ranks, True, False)
    assert torch.equal(lean[2], HA)
    for other in (gate, lean):
        differ = [n for i, (n, a, b) in enumerate(zip(NAMES, other, kept)) if i != 2 and not torch.equal(a, b)]
        assert not differ, differ


@needs_triton
@pytest.mark.parametrize("lean,finish_up", CASES, ids=["lean", "gate_kept", "finished"])
def test_fused_backward_is_the_unfused_one_up_to_the_order_of_sums(monkeypatch, lean, finish_up):
    # The dots as they are: where fused and unfused round a value differently it is by one unit of its last place.
    ranks = (4, 4, 4)
    inputs = _inputs(150, 300, ranks, seed=3)
    for name, a, b in zip(NAMES, _backward(True, monkeypatch, inputs, ranks, lean, finish_up),
                          _backward(False, monkeypatch, inputs, ranks, lean, finish_up)):  # fmt: skip
        if a is not None:  # a bf16 unit in the last place, of the value or of the largest (fp32 sums of such)
            torch.testing.assert_close(
                a.float(), b.float(), rtol=2**-7, atol=2**-7 * b.float().abs().max().item(), msg=name
            )


@needs_triton
def test_products_left_out_are_not_formed_and_the_rest_keep_their_bits(monkeypatch):
    # Frozen adapters (no dA_d, dB_g, dB_u wanted): those products come back None, the others with the bits of the
    # call that forms all of them.
    ranks = (4, 4, 4)
    inputs = _inputs(70, 300, ranks, seed=1)
    every = _backward(True, monkeypatch, inputs, ranks, True, False)
    some = _backward(True, monkeypatch, inputs, ranks, True, False, [True, False, True, False, False, True])
    for i, (a, b) in enumerate(zip(some, every)):
        assert a is None if i in (3, 5, 7) else torch.equal(a, b), i


@needs_triton
def test_ranks_above_16_run_unfused(monkeypatch):
    # The fused tile spills at R_PAD 32 and 64 (compiled for sm_90): those layers keep the unfused kernels, which
    # _backward checks by whether the fused one was called.
    ranks = (32, 4, 4)
    inputs = _inputs(70, 300, ranks, seed=2)
    _backward(True, monkeypatch, inputs, ranks, True, False)
    assert not mod._fused(inputs[1], 4, 4, 32) and mod._fused(inputs[1], 4, 4, 16)


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


@needs_triton
def test_a_whole_model_trains_with_the_same_bits_lean_or_kept_and_close_to_unfused(tmp_path, monkeypatch):
    # A tiny bf16 Llama's training step with the fused kernels on, offloaded checkpoints and the attention stash: the
    # lean recompute (every layer) and every layer keeping its MLP outputs give the same loss and gradients bit for
    # bit; the unfused kernels give them up to the order of fp32 sums.
    from raytune_llm.models.settings import set_keep_mlp_layers
    from tests.kernels._tolerance import patched_step, tiny_bf16_llama

    model, ids = tiny_bf16_llama(tmp_path)
    layers = model.get_base_model().config.num_hidden_layers
    calls = []
    real = mod.lora_swiglu_grad
    monkeypatch.setattr(mod, "lora_swiglu_grad", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(mod, "_FUSED", [True])
    loss_lean, g_lean = patched_step(model, ids)
    loss_kept, g_kept = patched_step(model, ids, setup=lambda m: set_keep_mlp_layers(m, layers))
    assert len(calls) == 2 * layers
    monkeypatch.setattr(mod, "_FUSED", [False])
    loss_unfused, g_unfused = patched_step(model, ids)
    assert len(calls) == 2 * layers and torch.equal(loss_kept, loss_lean)
    for name in g_lean:
        assert torch.equal(g_kept[name], g_lean[name]), name
        ref = g_unfused[name].float()
        torch.testing.assert_close(g_lean[name].float(), ref, rtol=2**-6, atol=2**-6 * ref.abs().max().item())
    torch.testing.assert_close(loss_lean, loss_unfused, rtol=1e-3, atol=0)


def test_the_default_tile_compiles_for_the_h200_without_spilling_kilobytes():
    # Compiled for sm_90 here (no GPU: Triton's own ptxas and cuobjdump), in a process without the interpreter.
    # Session 21's first tiles held each rank update whole in every warp and spilled ~3 KB a thread; the default
    # tile, transposed, spills 32-48 B at rank 16.
    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parents[2] / "bench" / "kernels" / "spills.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--max-stack", "128"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("lean,finish_up", CASES, ids=["lean", "gate_kept", "finished"])
def test_fused_backward_at_llama_shapes_on_the_gpu(monkeypatch, lean, finish_up):
    # 4,096 rows of Llama-3.1-8B's MLP at rank 16, on the GPU's own tiles (each program walks many row tiles):
    # fused against unfused, equal up to the order of fp32 sums (the rank updates as warpgroup MMAs against
    # mma.sync); how many elements differ is printed for the record.
    ranks = (16, 16, 16)
    inputs = _inputs(4096, 14336, ranks, seed=3, device="cuda")
    fused = _backward(True, monkeypatch, inputs, ranks, lean, finish_up)
    unfused = _backward(False, monkeypatch, inputs, ranks, lean, finish_up)
    for name, a, b in zip(NAMES, fused, unfused):
        if a is None:
            continue
        print(f"{name}: {(a != b).sum().item()} of {a.numel()} differ")
        torch.testing.assert_close(
            a.float(), b.float(), rtol=2**-7, atol=2**-7 * b.float().abs().max().item(), msg=name
        )


@pytest.mark.gpu
def test_a_lean_recompute_gives_a_kept_layers_bits_at_llama_shapes_on_the_gpu(monkeypatch):
    # The property training relies on, with the GPU's dots: lean == gate kept == kept, bit for bit.
    ranks = (16, 16, 16)
    _assert_lean_is_kept(monkeypatch, _inputs(4096, 14336, ranks, seed=5, device="cuda"), ranks)
