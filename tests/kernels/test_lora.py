"""Fused LoRA ops (O, QKV, MLP) against reference.lora_*, and against real PEFT layers.

Kernel vs reference: forward output, dX and every dA / dB under one upstream gradient, fp32 and bf16
(flash-attention rule), odd shapes (non-power-of-two widths and ranks, a single row, 3-D input),
non-contiguous inputs, dense and NF4 bases (QLoRA parity: the fused NF4 path against the reference
on the dequantized weight). PEFT tests prove the layout: ``lora_A.weight`` is ``A``,
``lora_B.weight`` is ``B``, ``scaling`` is PEFT's, on an ``nn.Linear``, a transformers ``LlamaMLP``
and a bitsandbytes ``Linear4bit``.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from peft import LoraConfig, get_peft_model

from raytune_llm.kernels import reference
from raytune_llm.kernels.lora import LoRAWeight, lora_linear, lora_mlp, lora_qkv
from raytune_llm.kernels.nf4 import NF4Weight
from tests.kernels._tolerance import check_against_reference, kernel_device, needs_triton

DTYPES = [torch.float32, torch.bfloat16]
# (out, in, r, scaling) per projection; widths and ranks deliberately not powers of two.
HIDDEN, INTER = 24, 40
SPECS = {
    "linear": [(HIDDEN, 36, 5, 2.0)],
    "qkv": [(HIDDEN, HIDDEN, 5, 2.0), (12, HIDDEN, 3, 0.5), (12, HIDDEN, 6, 1.0)],
    "mlp": [(INTER, HIDDEN, 5, 2.0), (INTER, HIDDEN, 3, 0.5), (HIDDEN, INTER, 4, 1.0)],
}
OPS = {"linear": (lora_linear, reference.lora_linear), "qkv": (lora_qkv, reference.lora_qkv)}
OPS["mlp"] = (lora_mlp, reference.lora_mlp)


def _base(out_f, in_f, gen, kind, dtype, device):
    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(device)
    if kind == "dense":
        return w.to(dtype)  # rounded once: both runs see the same weight values
    # Quantized where it will run (bitsandbytes' CUDA kernel on the GPU lane, its CPU backend here).
    packed, qs = bnbF.quantize_4bit(w.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4")
    return NF4Weight.from_bnb(packed, qs)


def _case(op, kind, dtype, device, seed=0, specs=None):
    """fp32 adapter bases [A_1, B_1, ...], frozen bases and scalings for one op."""
    gen = torch.Generator().manual_seed(seed)
    bases, adapters, scalings = [], [], []
    for out_f, in_f, r, s in specs or SPECS[op]:
        bases.append(_base(out_f, in_f, gen, kind, dtype, device))
        adapters += [(torch.randn(r, in_f, generator=gen) / in_f**0.5).to(device)]
        adapters += [(torch.randn(out_f, r, generator=gen) / r**0.5).to(device)]
        scalings.append(s)
    return bases, adapters, scalings


def _bind(fn, bases, scalings):
    """``f(x, A_1, B_1, ...)`` for check_against_reference: the frozen bases ride in the closure."""

    def call(x, *adapters):
        ws = [LoRAWeight(b, a, bb, s) for b, a, bb, s in zip(bases, adapters[0::2], adapters[1::2], scalings)]
        return fn(x, *ws)

    return call


LAYOUTS = {
    # name: (x leading shape, view on x, view on each adapter). Enough rows (37, 64) that the bf16
    # rank-r gradients (sums over rows) are judged on their statistics, not on one lucky rounding.
    "rows": ((37,), None, None),
    "single_row": ((1,), None, None),
    "batched_strided": ((4, 16), "x_strided", "adapter_t"),
}


def _run_case(op, kind, dtype, layout, device, specs=None):
    specs = specs or SPECS[op]
    bases, adapters, scalings = _case(op, kind, dtype, device, specs=specs)
    lead, xview, aview = LAYOUTS[layout] if isinstance(layout, str) else layout
    in_f = specs[0][1]
    gen = torch.Generator().manual_seed(1)
    views = [None] * (1 + len(adapters))
    if xview == "x_strided":  # every other column of a [.., 2*in] tensor: non-contiguous rows
        x = torch.randn(*lead, 2 * in_f, generator=gen).to(device)
        views[0] = lambda t: t[..., ::2]
    else:
        x = torch.randn(*lead, in_f, generator=gen).to(device)
    if aview == "adapter_t":  # adapters handed in as transposed views (column-major)
        adapters = [a.t().contiguous() for a in adapters]
        views[1:] = [lambda t: t.t()] * len(adapters)
    names = ["x"] + [f"{n}{i}" for i in range(len(bases)) for n in ("A", "B")]
    fn, ref = OPS[op]
    check_against_reference(
        _bind(fn, bases, scalings), _bind(ref, bases, scalings), [x, *adapters], dtype, views, names
    )


@needs_triton
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("op", list(OPS))
def test_matches_reference(op, kind, dtype, layout):
    _run_case(op, kind, dtype, layout, kernel_device())


@needs_triton
def test_fp32_master_adapters_with_bf16_activations():
    # Mixed precision: fp32 A/B, bf16 x. The op computes in bf16 and returns grads in fp32.
    device = kernel_device()
    bases, adapters, scalings = _case("mlp", "nf4", torch.bfloat16, device, seed=4)
    x = torch.randn(5, HIDDEN, device=device).to(torch.bfloat16).requires_grad_()
    leaves = [a.clone().requires_grad_() for a in adapters]
    ref_leaves = [a.clone().requires_grad_() for a in adapters]
    x_ref = x.detach().clone().requires_grad_()
    y = _bind(lora_mlp, bases, scalings)(x, *leaves)
    y_ref = _bind(reference.lora_mlp, bases, scalings)(x_ref, *ref_leaves)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == torch.float32
        scale = want.grad.abs().max()
        assert (got.grad - want.grad).abs().max() <= 2e-2 * scale, "bf16 adapter grads drift from the reference"


@needs_triton
def test_mlp_backward_twice_raises():
    device = kernel_device()
    bases, adapters, scalings = _case("mlp", "dense", torch.float32, device)
    leaves = [a.clone().requires_grad_() for a in adapters]
    y = _bind(lora_mlp, bases, scalings)(torch.randn(3, HIDDEN, device=device, requires_grad=True), *leaves)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        y.sum().backward()


@needs_triton
def test_outputs_may_be_modified_in_place():
    # The fused RoPE rotates Q and K in place: outputs must not be views autograd forbids editing.
    device = kernel_device()
    bases, adapters, scalings = _case("qkv", "dense", torch.float32, device)
    grads = []
    for fn in (lora_qkv, reference.lora_qkv):
        x = torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(5)).to(device).requires_grad_()
        leaves = [a.clone().requires_grad_() for a in adapters]
        q, k, v = _bind(fn, bases, scalings)(x, *leaves)
        q.mul_(2.0)
        k.add_(1.0)
        (q.square().sum() + k.square().sum() + v.sum()).backward()
        grads.append([x.grad] + [t.grad for t in leaves])
    _compare_grads(grads[0], grads[1])  # fp32, different summation order: rtol 1e-4


def test_shape_errors():
    w = LoRAWeight(torch.randn(8, 6), torch.randn(2, 6), torch.randn(8, 2), 1.0)
    with pytest.raises(ValueError, match="expects 6"):
        lora_linear(torch.randn(3, 5), w)
    with pytest.raises(ValueError, match=r"A must be \[r, in\]"):
        lora_linear(torch.randn(3, 6), w._replace(B=torch.randn(8, 3)))
    with pytest.raises(ValueError, match="does not match"):
        lora_linear(torch.randn(3, 6), w._replace(base=torch.randn(9, 6)))
    with pytest.raises(TypeError, match="expected a LoRAWeight"):
        lora_linear(torch.randn(3, 6), (w.base, w.A, w.B, 1.0))
    with pytest.raises(ValueError, match="intermediate sizes disagree"):
        lora_mlp(torch.randn(3, 6), w, w._replace(B=torch.randn(7, 2), base=torch.randn(7, 6)), w)


# ---- PEFT layout --------------------------------------------------------------------------------


def _peft_lora_weight(layer, base) -> LoRAWeight:
    return LoRAWeight(base, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"])


def _adapter_grads(layers):
    return [t.grad for lay in layers for t in (lay.lora_A["default"].weight, lay.lora_B["default"].weight)]


def _peft(model, targets, r=5, alpha=15):
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg)


def _compare_grads(got, want, rtol=1e-4):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None and w is not None, f"grad {i} missing"
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item(), msg=f"grad {i}")


def test_matches_peft_linear_and_qkv():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {n: torch.nn.Linear(HIDDEN, o, bias=False) for n, o in (("q", 24), ("k", 12), ("v", 12))}
    )
    pm = _peft(model, ["q", "k", "v"])
    layers = [pm.base_model.model[n] for n in ("q", "k", "v")]
    ws = [_peft_lora_weight(lay, lay.base_layer.weight) for lay in layers]
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    want = [lay(x) for lay in layers]
    torch.autograd.backward(want, [torch.ones_like(w) for w in want])
    want_g = [x.grad.clone()] + _adapter_grads(layers)
    pm.zero_grad()
    x.grad = None
    got = lora_qkv(x, *ws)
    torch.autograd.backward(got, [torch.ones_like(g) for g in got])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    _compare_grads([x.grad] + _adapter_grads(layers), want_g)
    torch.testing.assert_close(lora_linear(x, ws[0]), layers[0](x), rtol=1e-5, atol=1e-5)


def test_matches_peft_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(1)
    mlp = LlamaMLP(
        LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=4, num_key_value_heads=4)
    )
    pm = _peft(mlp, ["gate_proj", "up_proj", "down_proj"], r=6, alpha=12)
    inner = pm.base_model.model
    layers = [inner.gate_proj, inner.up_proj, inner.down_proj]
    x = torch.randn(3, 4, HIDDEN, requires_grad=True)
    want = pm(x)
    want.backward(torch.ones_like(want))
    want_g = [x.grad.clone()] + _adapter_grads(layers)
    pm.zero_grad()
    x.grad = None
    got = lora_mlp(x, *(_peft_lora_weight(lay, lay.base_layer.weight) for lay in layers))
    got.backward(torch.ones_like(got))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _compare_grads([x.grad] + _adapter_grads(layers), want_g)


def test_matches_peft_qlora_linear4bit():
    # QLoRA layout: PEFT's lora.Linear4bit over a real bitsandbytes Linear4bit quantized on the CPU.
    torch.manual_seed(2)
    dense = torch.randn(HIDDEN, 40) * 0.1
    q = bnb.nn.Linear4bit(40, HIDDEN, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
    model = torch.nn.ModuleDict({"o": q.to("cpu")})
    pm = _peft(model, ["o"], r=4, alpha=8)
    layer = pm.base_model.model["o"]
    x = torch.randn(6, 40, requires_grad=True)
    want = layer(x)
    want.backward(torch.ones_like(want))
    want_g = [x.grad.clone()] + _adapter_grads([layer])
    layer.zero_grad()
    x.grad = None
    got = lora_linear(x, _peft_lora_weight(layer, NF4Weight.from_bnb(layer.base_layer)))
    got.backward(torch.ones_like(got))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _compare_grads([x.grad] + _adapter_grads([layer]), want_g)


# ---- real sizes (GPU) ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("hidden,inter", [(4096, 14336), (8192, 28672)])
def test_real_sizes_bf16(hidden, inter, kind):
    kv = hidden // 4  # 8 kv heads of 128 for 32 (8B) / 64 (70B) query heads
    specs = {
        "linear": [(hidden, hidden, 16, 1.0)],
        "qkv": [(hidden, hidden, 16, 1.0), (kv, hidden, 16, 1.0), (kv, hidden, 16, 1.0)],
        "mlp": [(inter, hidden, 16, 1.0), (inter, hidden, 16, 1.0), (hidden, inter, 16, 1.0)],
    }
    for op in ("linear", "qkv", "mlp"):
        _run_case(op, kind, torch.bfloat16, ((2, 1024), None, None), torch.device("cuda"), specs[op])


def _toy_layer_parts(device):
    """NF4 QKV, O and MLP cases for a toy checkpointed layer (fp32, the module's widths)."""
    qkv = _case("qkv", "nf4", torch.float32, device, seed=1)
    o = _case("linear", "nf4", torch.float32, device, seed=2, specs=[(HIDDEN, HIDDEN, 5, 2.0)])
    mlp = _case("mlp", "nf4", torch.float32, device, seed=3)
    return qkv, o, mlp


def _toy_layer(parts):
    """Fresh adapter leaves and a layer over them: QKV of h, O on a mix of q, k and v, the MLP on the residual."""
    qkv, o, mlp = parts
    leaves = {k: [a.clone().requires_grad_() for a in case[1]] for k, case in (("qkv", qkv), ("o", o), ("mlp", mlp))}

    def layer(h):
        q, k, v = _bind(lora_qkv, qkv[0], qkv[2])(h, *leaves["qkv"])
        h = h + _bind(lora_linear, o[0], o[2])(q * k.sum() + v.mean(), *leaves["o"])
        return h + _bind(lora_mlp, mlp[0], mlp[2])(h, *leaves["mlp"])

    return leaves, layer


def _toy_input(device):
    return torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(9)).to(device).requires_grad_()


@needs_triton
def test_dequantize_once_reuses_the_recompute_weights(monkeypatch):
    # A checkpointed "layer" (QKV, O on q, MLP on o) with NF4 bases: with dequantize_once the backward takes
    # the weights the recompute dequantized, so each base is dequantized 2 times per step instead of 3, and
    # the gradients are the same bits (the same dequantized values feed the same GEMMs).
    import raytune_llm.kernels.lora as lora_mod
    from raytune_llm.models.checkpointing import checkpoint_layer

    device = kernel_device()
    parts = _toy_layer_parts(device)
    n_bases = sum(len(case[0]) for case in parts)
    calls = []
    real = lora_mod.nf4_dequantize
    monkeypatch.setattr(lora_mod, "nf4_dequantize", lambda w, dt: calls.append(w.shape) or real(w, dt))

    def run(dequant_once):
        leaves, layer = _toy_layer(parts)
        x = _toy_input(device)
        calls.clear()
        y = checkpoint_layer(layer, x, offload=False, dequant_once=dequant_once)
        y.square().sum().backward()
        return len(calls), [x.grad] + [t.grad for ts in leaves.values() for t in ts]

    n_twice, g_twice = run(False)
    n_once, g_once = run(True)
    assert n_twice == 3 * n_bases  # forward, recompute, backward
    assert n_once == 2 * n_bases  # forward, recompute (kept for backward)
    assert not lora_mod._once, "the dequantize_once block was left open"
    for a, b in zip(g_once, g_twice):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dequantize_once_keeps_no_weight_dequantized_for_its_last_use():
    # Inside a dequantize_once block the backward's dX is each weight's last use: a weight the recompute did not
    # dequantize (a lean or replayed projection) is dequantized for it and dropped, not held until the block ends.
    import raytune_llm.kernels.lora as lora_mod

    gen = torch.Generator().manual_seed(0)
    w = _base(32, 64, gen, "nf4", torch.float32, kernel_device())
    with lora_mod.dequantize_once():
        cache = lora_mod._once[-1]
        last = lora_mod._dense(w, torch.float32, last_use=True)
        assert not cache, "a last use was kept"
        first = lora_mod._dense(w, torch.float32)  # the recompute's use: kept for the backward
        assert len(cache) == 1
        again = lora_mod._dense(w, torch.float32, last_use=True)  # the backward takes it
        assert again is first and not cache
    torch.testing.assert_close(last, first, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("offload", [False, True])
def test_lean_recompute_skips_the_down_projection_with_the_same_gradients(monkeypatch, offload):
    # The same checkpointed "layer" as above, recomputed in full and lean: lean leaves out the MLP's down
    # projection (one NF4 dequantization and its GEMM fewer per step) and gives the same gradients bit for
    # bit, because backward reads nothing the down projection produced. Offloaded, the layers share one
    # OffloadChain (the second layer's backward prefetches the first one's input).
    import raytune_llm.kernels.lora as lora_mod
    from raytune_llm.models.checkpointing import OffloadChain, checkpoint_layer

    device = kernel_device()
    parts = _toy_layer_parts(device)
    n_bases = sum(len(case[0]) for case in parts)
    down = parts[2][0][2]
    calls = []
    real = lora_mod.nf4_dequantize
    monkeypatch.setattr(lora_mod, "nf4_dequantize", lambda w, dt: calls.append(w is down) or real(w, dt))

    def run(lean):
        leaves, layer = _toy_layer(parts)
        x = _toy_input(device)
        calls.clear()
        chain = OffloadChain() if offload else None
        y = x
        for _ in range(2):  # two layers with the same weights
            y = checkpoint_layer(layer, y, offload=offload, lean=lean, chain=chain)
        y.square().sum().backward()
        return y.detach(), calls.count(True), len(calls), [x.grad] + [t.grad for ts in leaves.values() for t in ts]

    y_full, down_full, n_full, g_full = run(False)
    y_lean, down_lean, n_lean, g_lean = run(True)
    assert (down_full, n_full) == (6, 6 * n_bases)  # per layer: forward, recompute, backward
    assert (down_lean, n_lean) == (4, 6 * n_bases - 2)  # the recomputes skip the down projection
    assert not lora_mod._lean, "the lean_recompute block was left open"
    torch.testing.assert_close(y_lean, y_full, rtol=0, atol=0)  # the forward itself is never lean
    for a, b in zip(g_lean, g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("once", [False, True], ids=["dequant", "once"])
def test_kept_mlp_outputs_spare_the_recompute_its_gate_and_up(monkeypatch, offload, once):
    # keep_mlp: the forward keeps the MLP's finished gate and up outputs and the lean recompute takes them, so
    # gate and up are dequantized (and multiplied) twice per step instead of three times; the backward reads the
    # same tensors, so the gradients are the lean recompute's bit for bit. The kept tensors are let go once the
    # layer's backward has run.
    import raytune_llm.kernels.lora as lora_mod
    from raytune_llm.models.checkpointing import OffloadChain, checkpoint_layer

    device = kernel_device()
    parts = _toy_layer_parts(device)
    gate_up = {id(b) for b in parts[2][0][:2]}
    calls = []
    real = lora_mod.nf4_dequantize
    monkeypatch.setattr(lora_mod, "nf4_dequantize", lambda w, dt: calls.append(id(w) in gate_up) or real(w, dt))
    kept_sizes = []
    real_keep = lora_mod.keep_mlp_outputs

    def spy_keep(store):
        kept_sizes.append(store)
        return real_keep(store)

    monkeypatch.setattr("raytune_llm.models.checkpointing.keep_mlp_outputs", spy_keep)

    def run(keep):
        leaves, layer = _toy_layer(parts)
        x = _toy_input(device)
        calls.clear()
        kept_sizes.clear()
        chain = OffloadChain() if offload else None
        y = x
        for _ in range(2):
            y = checkpoint_layer(layer, y, offload=offload, lean=True, chain=chain, dequant_once=once, keep_mlp=keep)
        held = [len(store) for store in kept_sizes]
        y.square().sum().backward()
        return (
            y.detach(),
            calls.count(True),
            held,
            kept_sizes,
            [x.grad] + [t.grad for ts in leaves.values() for t in ts],
        )

    y_lean, n_lean, _, _, g_lean = run(False)
    y_keep, n_keep, held, stores, g_keep = run(True)
    assert n_lean == 2 * 2 * (2 if once else 3)  # 2 layers x (gate, up) x (forward, recompute[, backward])
    assert n_keep == 2 * 2 * 2  # forward, backward: the recompute runs neither GEMM
    assert held == [1, 1] and all(not store for store in stores)  # one MLP call kept per layer, taken by backward
    assert not lora_mod._keep and not lora_mod._reuse, "a keep/reuse block was left open"
    torch.testing.assert_close(y_keep, y_lean, rtol=0, atol=0)
    for a, b in zip(g_keep, g_lean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_triton
def test_an_mlp_split_over_tokens_keeps_nothing(monkeypatch):
    # models/patch.py runs a split MLP inside keep_mlp_outputs(None): the split exists to hold no [tokens, I] tensor,
    # so a kept layer's split MLP keeps nothing and its recompute runs the GEMMs; the gradients are the lean ones.
    import raytune_llm.kernels.lora as lora_mod
    from raytune_llm.models.checkpointing import checkpoint_layer
    from raytune_llm.models.tiling import tiled_over_tokens

    device = kernel_device()
    _, _, mlp = _toy_layer_parts(device)
    stores = []
    real_keep = lora_mod.keep_mlp_outputs
    monkeypatch.setattr(
        "raytune_llm.models.checkpointing.keep_mlp_outputs", lambda store: stores.append(store) or real_keep(store)
    )

    def run(keep):
        leaves = [a.clone().requires_grad_() for a in mlp[1]]
        fn = _bind(lora_mlp, mlp[0], mlp[2])

        def layer(h):
            with lora_mod.keep_mlp_outputs(None):
                return h + tiled_over_tokens(lambda rows: fn(rows, *leaves), h, 5, leaves)

        x = _toy_input(device)
        y = checkpoint_layer(layer, x, offload=False, lean=True, keep_mlp=keep)
        held = [len(store) for store in stores]
        y.square().sum().backward()
        return held, [x.grad] + [t.grad for t in leaves]

    held_lean, g_lean = run(False)
    held_keep, g_keep = run(True)
    assert held_lean == [] and held_keep == [0]  # the kept layer's store stayed empty
    for a, b in zip(g_keep, g_lean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_triton
def test_kept_mlp_outputs_of_another_shape_are_refused():
    import raytune_llm.kernels.lora as lora_mod

    device = kernel_device()
    bases, adapters, scalings = _case("mlp", "dense", torch.float32, device, seed=4)
    fn = _bind(lora_mlp, bases, scalings)
    store = []
    with torch.no_grad(), lora_mod.keep_mlp_outputs(store):
        fn(torch.randn(3, HIDDEN, device=device), *adapters)
    assert len(store) == 1
    with lora_mod.lean_recompute(), lora_mod.reuse_mlp_outputs(store):
        with pytest.raises(RuntimeError, match="do not match this call"):
            fn(torch.randn(5, HIDDEN, device=device).requires_grad_(), *[a.requires_grad_() for a in adapters])


@needs_triton
def test_lean_recompute_leaves_no_grad_calls_and_plain_calls_whole():
    # Inside the block only a call that records a graph is lean: under no_grad (no backward will follow, so the
    # value is what the caller wants) and outside the block the MLP returns its real output.
    from raytune_llm.kernels.lora import lean_recompute

    device = kernel_device()
    bases, adapters, scalings = _case("mlp", "dense", torch.float32, device, seed=4)
    fn = _bind(lora_mlp, bases, scalings)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(5)).to(device)
    want = fn(x, *adapters)
    with lean_recompute():
        with torch.no_grad():
            torch.testing.assert_close(fn(x, *adapters), want, rtol=0, atol=0)
        lean = fn(x.requires_grad_(), *[a.requires_grad_() for a in adapters])
    assert lean.shape == want.shape and not lean.detach().any()
    lean.sum().backward()  # the graph is whole: every input gets a gradient
    assert x.grad is not None and all(a.grad is not None for a in adapters)


@needs_triton
def test_lean_qkv_with_a_replayed_attention_skips_the_qkv_projections(monkeypatch):
    # A checkpointed layer whose attention is stashed (models.attention_stash): the recompute replays attention,
    # so with lean_qkv its Q/K/V base GEMMs are skipped too (their values are not read); the gradients are the
    # whole recompute's bit for bit, and each Q/K/V base is dequantized twice per step instead of three times.
    import torch.nn.functional as F

    import raytune_llm.kernels.lora as lora_mod
    from raytune_llm.models import attention_stash
    from raytune_llm.models.checkpointing import OffloadChain, checkpoint_layer

    device = kernel_device()
    heads, d = 4, 6  # q: 24 = 4 x 6; k, v: 12 = 2 x 6 (GQA)
    qkv, o, mlp = _toy_layer_parts(device)
    qkv_ids = {id(b) for b in qkv[0]}
    calls = []
    real = lora_mod.nf4_dequantize
    monkeypatch.setattr(lora_mod, "nf4_dequantize", lambda w, dt: calls.append(id(w) in qkv_ids) or real(w, dt))

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)

    def run(stash):
        leaves = {
            k: [a.clone().requires_grad_() for a in case[1]] for k, case in (("qkv", qkv), ("o", o), ("mlp", mlp))
        }

        def layer(h):
            b, s, _ = h.shape
            q, k, v = _bind(lora_qkv, qkv[0], qkv[2])(h, *leaves["qkv"])
            q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
            a = attention_stash.run(attn, q * 1.5, k, v).reshape(b, s, heads * d)
            h = h + _bind(lora_linear, o[0], o[2])(a, *leaves["o"])
            return h + _bind(lora_mlp, mlp[0], mlp[2])(h, *leaves["mlp"])

        x = _toy_input(device)
        calls.clear()
        chain = OffloadChain()
        y = x
        for _ in range(2):
            y = checkpoint_layer(layer, y, offload=True, lean=True, chain=chain, stash=stash, lean_qkv=True)
        y.square().sum().backward()
        return y.detach(), calls.count(True), [x.grad] + [t.grad for ts in leaves.values() for t in ts]

    y_full, n_full, g_full = run(False)
    y_stash, n_stash, g_stash = run(True)
    assert (n_full, n_stash) == (2 * 3 * 3, 2 * 3 * 2)  # 2 layers x 3 bases x (forward, [recompute,] backward)
    assert not lora_mod._lean and not attention_stash._mode, "a recompute block was left open"
    torch.testing.assert_close(y_stash, y_full, rtol=0, atol=0)
    # Bit for bit under the interpreter; on CUDA fp32 SDPA's backward (memory-efficient kernel) may sum dq in
    # another order from one run to the next.
    exact = dict(rtol=0, atol=0) if device.type == "cpu" else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(g_stash, g_full):
        torch.testing.assert_close(a, b, **exact)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_backward_finishing_gate_and_up_gives_the_forward_then_backward_bits(dtype):
    # A lean recompute runs no forward kernel: the backward kernel adds gate's and up's rank updates to the base
    # outputs itself. H, dG and dU must be the bits of the forward kernel followed by the plain backward.
    from raytune_llm.kernels.lora_swiglu import lora_swiglu_backward, lora_swiglu_forward

    device = kernel_device()
    gen = torch.Generator().manual_seed(3)
    n, inter, rg, ru, rd = 37, 150, 5, 3, 4  # odd widths, ranks under tl.dot's 16, rows over one tile edge

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    G0, U0, dH0 = t(n, inter), t(n, inter), t(n, inter)
    xa_g, xa_u, Bg, Bu, low, Ad = t(n, rg), t(n, ru), t(inter, rg), t(inter, ru), t(n, rd), t(rd, inter)
    G, U, dH = G0.clone(), U0.clone(), dH0.clone()
    H_fwd = lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5)
    lora_swiglu_backward(dH, G, U, low, Ad)
    G2, U2, dH2 = G0.clone(), U0.clone(), dH0.clone()
    lora_swiglu_backward(dH2, G2, U2, low, Ad, finish=(xa_g, xa_u, Bg, Bu, 2.0, 0.5))
    torch.testing.assert_close(dH2, dH, rtol=0, atol=0)  # H, written over dH
    torch.testing.assert_close(dH2, H_fwd, rtol=0, atol=0)  # the H the forward kernel wrote
    torch.testing.assert_close(G2, G, rtol=0, atol=0)  # dG
    torch.testing.assert_close(U2, U, rtol=0, atol=0)  # dU


@needs_triton
def test_swiglu_kernels_walking_row_spans_give_the_same_bits(monkeypatch):
    # Each program walks a span of rows a tile at a time (its adapter tiles loaded once): the span is a launch
    # setting, not a change of the math. Every kernel variant (the forward writing G, U and H or H alone, the
    # backward on finished G and U, finishing both, finishing U alone) writes the same bits with one 16-row tile a
    # program and with two spans of four 16-row steps, across a column-block edge and rows past the end inside a span.
    from raytune_llm.kernels import lora_swiglu as mod

    device = kernel_device()
    gen = torch.Generator().manual_seed(5)
    n, inter, r = 70, 300, 4

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=torch.bfloat16)

    G0, U0, dH0 = t(n, inter), t(n, inter), t(n, inter)
    xa_g, xa_u, Bg, Bu, low, Ad = t(n, r), t(n, r), t(inter, r), t(inter, r), t(n, r), t(r, inter)
    fin = (xa_g, xa_u, Bg, Bu, 2.0, 0.5)

    def run():
        out = []
        G, U = G0.clone(), U0.clone()
        out.append(mod.lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5, store_gu=False))
        out.append(mod.lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5))
        dH = dH0.clone()
        mod.lora_swiglu_backward(dH, G, U, low, Ad)  # on the finished G and U
        out += [dH, G, U]
        for finish_gate in (True, False):  # a lean recompute's backward; U alone (the finished gate kept)
            G, U, dH = (G0.clone() if finish_gate else out[2].clone()), U0.clone(), dH0.clone()
            mod.lora_swiglu_backward(dH, G, U, low, Ad, finish=fin, finish_gate=finish_gate)
            out += [dH, G, U]
        return out

    def use(setting, spans_interpret):
        monkeypatch.setattr(mod, "_LAUNCH", setting)
        monkeypatch.setattr(mod, "_TILE_INTERPRET", setting[:2])  # the same tile under the interpreter
        monkeypatch.setattr(mod, "_SPANS_INTERPRET", spans_interpret)
        cfg, grid = mod._tile_cfg(G0, [r])
        return cfg["SPAN"], cfg["BM"], grid

    assert use((16, 128, 4, 1, 5), None) == (16, 16, (3, 5))  # one 16-row step a program
    one_step = run()
    assert use((16, 128, 4, 2, 2), 2) == (64, 16, (3, 2))  # two spans of 64 rows, four steps each
    spans = run()
    assert len(spans) == len(one_step) == 11
    for a, b in zip(spans, one_step):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_forward_without_gate_and_up_writes_the_same_h(dtype):
    # A checkpointed layer's forward needs H alone (its recompute rebuilds G and U): store_gu=False leaves the base
    # outputs in G and U and writes the same H.
    from raytune_llm.kernels.lora_swiglu import lora_swiglu_forward

    device = kernel_device()
    gen = torch.Generator().manual_seed(4)
    n, inter, rg, ru = 37, 150, 5, 3

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    G0, U0 = t(n, inter), t(n, inter)
    xa_g, xa_u, Bg, Bu = t(n, rg), t(n, ru), t(inter, rg), t(inter, ru)
    G, U = G0.clone(), U0.clone()
    H = lora_swiglu_forward(G, U, xa_g, xa_u, Bg, Bu, 2.0, 0.5)
    G2, U2 = G0.clone(), U0.clone()
    H2 = lora_swiglu_forward(G2, U2, xa_g, xa_u, Bg, Bu, 2.0, 0.5, store_gu=False)
    assert torch.equal(H2, H)
    assert torch.equal(G2, G0) and torch.equal(U2, U0) and not torch.equal(G, G0)


@needs_triton
def test_a_checkpointed_forward_leaves_gate_and_up_unwritten_unless_kept(monkeypatch):
    # lora_mlp under no_grad (a checkpointed layer's forward) asks the kernel for H alone; with grad, or when the
    # layer keeps its MLP outputs, the finished G and U are written (backward or the recompute reads them).
    import raytune_llm.kernels.lora as lora_mod
    from raytune_llm.kernels.lora import keep_mlp_outputs, lora_mlp

    seen = []
    real = lora_mod.lora_swiglu_forward
    monkeypatch.setattr(lora_mod, "lora_swiglu_forward", lambda *a, **k: seen.append(k["store_gu"]) or real(*a, **k))
    device = kernel_device()
    bases, adapters, scalings = _case("mlp", "dense", torch.float32, device, seed=2)
    gate, up, down = (LoRAWeight(b, a, bb, sc) for b, a, bb, sc in zip(bases, adapters[0::2], adapters[1::2], scalings))
    x = torch.randn(37, HIDDEN, generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        y_plain = lora_mlp(x, gate, up, down)
        kept: list = []
        with keep_mlp_outputs(kept):
            lora_mlp(x, gate, up, down)
    y_grad = lora_mlp(x.detach().requires_grad_(), gate, up, down)
    assert seen == [False, True, True] and len(kept) == 1
    assert torch.equal(y_plain, y_grad.detach())


@needs_triton
def test_unit_scaling_runs_no_multiply_in_backward(monkeypatch):
    # alpha = r (scaling 1, the benchmarks' setting): the backward's rank-r products are used as they come, no
    # `mul_` by 1.0 (one kernel each on the GPU); any other scaling is still applied (the reference tests above).
    device = kernel_device()
    specs = [(s[0], s[1], s[2], 1.0) for s in SPECS["mlp"]]
    bases, adapters, scalings = _case("mlp", "dense", torch.bfloat16, device, specs=specs)
    calls = []
    real = torch.Tensor.mul_

    def counted(self, *args, **kwargs):
        calls.append(args)
        return real(self, *args, **kwargs)

    x = torch.randn(9, HIDDEN, device=device).to(torch.bfloat16).requires_grad_()
    params = [a.clone().requires_grad_() for a in adapters]
    out = _bind(lora_mlp, bases, scalings)(x, *params)
    monkeypatch.setattr(torch.Tensor, "mul_", counted)
    out.float().sum().backward()
    assert not calls and all(p.grad is not None for p in params)


@needs_triton
@pytest.mark.parametrize("op", ["linear", "qkv", "mlp"])
def test_adapters_reach_the_compute_dtype_in_one_copy(op):
    # fp32 master adapters become bf16 inside the op through one multi-tensor copy per call (one kernel on CUDA),
    # no concatenation or per-adapter cast; the values are those of `.to(bf16)` (the reference tests above hold the
    # results), and each adapter still gets its fp32 gradient.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = args[0] if args else None
            self.names.append((func.overloadpacket.__name__, getattr(first, "shape", None)))
            return func(*args, **(kwargs or {}))

    device = kernel_device()
    fn = OPS[op][0]
    bases, adapters, scalings = _case(op, "dense", torch.bfloat16, device)
    x = torch.randn(9, SPECS[op][0][1], device=device).to(torch.bfloat16).requires_grad_()
    params = [a.clone().requires_grad_() for a in adapters]
    with Ops() as seen:
        out = _bind(fn, bases, scalings)(x, *params)
    names = [name for name, _ in seen.names]
    assert names.count("_foreach_copy_") == 1 and "cat" not in names, names
    adapter_shapes = {a.shape for a in adapters}
    assert not [shape for name, shape in seen.names if name == "_to_copy" and shape in adapter_shapes], seen.names
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["qkv", "mlp"])
def test_fp32_adapter_gradients_are_not_rounded_to_bf16(op, monkeypatch):
    # On CUDA the adapters' gradients reach fp32 without a bf16 rounding of their product: dB from lora_pair's fp32
    # partial sums, dA from a GEMM writing fp32. Q's dB = dY^T (X A^T) is then within fp32 summation error of the
    # product in fp64 from the op's own bf16 operands (a bf16-rounded product is off by up to 2^-9 of its largest
    # element); every gradient differs from the cast path's (two bf16 GEMMs and a cast, forced here) by no more than
    # that path's rounding.
    import raytune_llm.kernels.lora_pair as lora_pair_mod
    from raytune_llm.kernels import _dispatch

    n, hidden, inter, r = 2048, 256, 512, 16
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    dims = (
        [(hidden, hidden), (hidden // 2, hidden), (hidden // 2, hidden)]
        if op == "qkv"
        else [(inter, hidden), (inter, hidden), (hidden, inter)]
    )
    bases = [(rand(o, i) / i**0.5).bfloat16() for o, i in dims]
    adapters = [t for o, i in dims for t in (rand(r, i) / i**0.5, rand(o, r) / r**0.5)]
    x = rand(n, hidden).bfloat16()
    fn = lora_qkv if op == "qkv" else lora_mlp

    def grads():
        ps = [a.clone().requires_grad_() for a in adapters]
        ws = [LoRAWeight(b, a, bb, 1.0) for b, a, bb in zip(bases, ps[0::2], ps[1::2])]
        out = fn(x, *ws)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator(device="cuda").manual_seed(1)
        torch.autograd.backward(outs, [torch.randn(o.shape, device="cuda", generator=g).bfloat16() for o in outs])
        return [p.grad for p in ps], g

    fp32_out, _ = grads()
    assert _dispatch._FP32_OUT_GEMM == [True]
    monkeypatch.setattr(_dispatch, "_FP32_OUT_GEMM", [False])
    monkeypatch.setattr(lora_pair_mod, "_PAIRED", [False])
    cast, _ = grads()
    for a, b in zip(fp32_out, cast):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 2**-7 * b.abs().max(), "beyond the cast path's rounding"
    assert all(not torch.equal(a, b) for a, b in zip(fp32_out[1::2], cast[1::2])), "a dB took the cast path"
    assert any(not torch.equal(a, b) for a, b in zip(fp32_out[0::2], cast[0::2])), "no dA took the fp32 GEMM"
    if op == "qkv":
        g = torch.Generator(device="cuda").manual_seed(1)
        dy = torch.randn(n, dims[0][0], device="cuda", generator=g).bfloat16()
        a_cat = torch.cat(adapters[0::2]).bfloat16()
        xa = x @ a_cat.t()  # the op's own X A^T (the same GEMM), Q's columns first
        exact = dy.double().t() @ xa[:, :r].double()
        err = (fp32_out[1].double() - exact).abs().max() / exact.abs().max()
        assert err < 2e-5, f"Q's dB relative error {err:.2e}: the product was rounded below fp32"


@needs_triton
@pytest.mark.parametrize("frozen", ["A", "B"])
def test_mlp_with_a_frozen_down_adapter_half(frozen):
    # An adapter half that does not require grad (frozen A or B of down): its products are skipped, the rest of
    # the gradients still match the reference.
    device = kernel_device()
    bases, adapters, scalings = _case("mlp", "dense", torch.bfloat16, device)
    x = torch.randn(9, HIDDEN, device=device).to(torch.bfloat16).requires_grad_()
    idx = 4 if frozen == "A" else 5
    params = [a.clone().requires_grad_(i != idx) for i, a in enumerate(adapters)]
    _bind(lora_mlp, bases, scalings)(x, *params).float().sum().backward()
    x_all = x.detach().clone().requires_grad_()
    params_all = [a.clone().requires_grad_() for a in adapters]
    _bind(lora_mlp, bases, scalings)(x_all, *params_all).float().sum().backward()
    assert params[idx].grad is None
    assert torch.equal(x.grad, x_all.grad)  # the skipped product changes no other gradient's bits
    for i, (p, q) in enumerate(zip(params, params_all)):
        if i != idx:
            assert torch.equal(p.grad, q.grad), i


@needs_triton
@pytest.mark.parametrize("once", [False, True], ids=["dequant", "once"])
def test_kept_mlp_outputs_in_host_memory_give_the_same_bits(monkeypatch, once):
    # keep_on_host: the kept gate and up outputs leave the device with the layer's input (host copies; on the CPU
    # clones) and come back with it for the layer's backward. The recompute still runs neither GEMM, and the
    # gradients are the lean recompute's bit for bit.
    import raytune_llm.kernels.lora as lora_mod
    import raytune_llm.models.attention_stash as stash_mod
    from raytune_llm.models.checkpointing import OffloadChain, checkpoint_layer

    device = kernel_device()
    parts = _toy_layer_parts(device)
    gate_up = {id(b) for b in parts[2][0][:2]}
    calls, stores, copies = [], [], [0]
    real = lora_mod.nf4_dequantize
    monkeypatch.setattr(lora_mod, "nf4_dequantize", lambda w, dt: calls.append(id(w) in gate_up) or real(w, dt))
    real_keep = lora_mod.keep_mlp_outputs
    monkeypatch.setattr("raytune_llm.models.checkpointing.keep_mlp_outputs", lambda s: stores.append(s) or real_keep(s))
    real_copy = stash_mod.HostCopies._to_host
    monkeypatch.setattr(
        stash_mod.HostCopies, "_to_host", lambda self, raw: copies.__setitem__(0, copies[0] + 1) or real_copy(self, raw)
    )

    def run(keep, on_host, gate_only=False):
        leaves, layer = _toy_layer(parts)
        x = _toy_input(device)
        calls.clear(), stores.clear()
        copies[0] = 0
        chain, y = OffloadChain(), x
        for _ in range(2):
            y = checkpoint_layer(
                layer, y, offload=True, lean=True, chain=chain, dequant_once=once, keep_mlp=keep, keep_on_host=on_host,
                keep_gate_only=gate_only,
            )  # fmt: skip
        sent = [[entry[0] is None and entry[1] is None for entry in store] for store in stores]
        made = copies[0]
        y.square().sum().backward()
        return y.detach(), calls.count(True), sent, made, [x.grad] + [t.grad for ts in leaves.values() for t in ts]

    y_lean, _, _, made_lean, g_lean = run(False, False)
    y_dev, n_dev, sent_dev, made_dev, g_dev = run(True, False)
    y_host, n_host, sent_host, made_host, g_host = run(True, True)
    y_gate, n_gate, sent_gate, made_gate, g_gate = run(True, True, gate_only=True)
    assert n_host == n_dev == 2 * 2 * 2  # forward and backward: the recompute runs neither gate nor up
    # the gate alone kept: the recompute runs up's GEMM again (its weight dequantized for it, once: kept for backward)
    assert n_gate == n_host + (0 if once else 2)
    assert sent_dev == [[False], [False]] and sent_host == sent_gate == [[True], [True]]  # they left the device's store
    assert made_dev == made_lean and made_host == made_lean + 2 * 2  # two more host copies a layer: G and U
    assert made_gate == made_lean + 2  # G alone
    assert all(not store for store in stores)  # taken by backward
    torch.testing.assert_close(y_host, y_lean, rtol=0, atol=0)
    torch.testing.assert_close(y_gate, y_lean, rtol=0, atol=0)
    for a, b, c, d in zip(g_host, g_dev, g_lean, g_gate):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
        torch.testing.assert_close(d, c, rtol=0, atol=0)


def test_host_kept_layers_are_spread_from_the_last_down():
    from raytune_llm.models.checkpointing import host_kept_layers

    assert host_kept_layers(26, 0) == set()
    assert host_kept_layers(26, 1) == {25}
    assert host_kept_layers(26, 3) == {25, 17, 9}
    assert host_kept_layers(4, 9) == {0, 1, 2, 3}  # no more than there are
    assert host_kept_layers(0, 2) == set()
    # the planner's copy of the rule (sharding may not import models) picks the same layers
    from raytune_llm.sharding.host_memory import host_kept_placement

    for below in range(0, 40):
        for n in range(0, 42):
            assert host_kept_placement(below, n) == host_kept_layers(below, n), (below, n)


def test_gate_only_layers_take_the_host_kept_layers_leftovers():
    from raytune_llm.models.checkpointing import host_gate_layers, host_kept_layers

    assert host_gate_layers(26, 3, 0) == set()
    assert host_gate_layers(26, 3, 1) == {23}  # the top one of those {25, 17, 9} left with no host-kept neighbour
    host = host_kept_layers(26, 3)
    two = host_gate_layers(26, 3, 2)
    assert len(two) == 2 and 23 in two and not two & (host | {i + 1 for i in host} | {i - 1 for i in host})
    # session 18's 1x65536 layout (30 layers below the GPU-kept ones, 14 host-kept: 29, 27, ..., 3): 1, not 28
    assert host_kept_layers(30, 14) == set(range(3, 30, 2)) and host_gate_layers(30, 14, 1) == {1}
    assert host_gate_layers(30, 15, 1) == {28}  # every layer left has a host-kept neighbour: the top one
    assert host_gate_layers(30, 14, 3) == {1, 0, 28}  # the two apart, then the rest
    assert host_gate_layers(4, 3, 9) == {0, 1, 2, 3} - host_kept_layers(4, 3)  # no more than are left
    assert host_gate_layers(4, 9, 2) == set()


def test_the_swiglu_kernels_compile_for_the_h200_without_spilling():
    # Compiled for sm_90 here (no GPU: Triton's own ptxas and cuobjdump), in a process without the interpreter, at
    # their launch setting (_LAUNCH), every variant: at most 128 B of local-memory stack a thread. Session
    # 21 measured a fused variant spilling ~3 KB a thread before any GPU time was spent on it; the row-span kernels
    # spill 72-88 B in the backward and run at 0.93 of copy bandwidth against 0.61-0.75 for the one-tile kernels.
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parents[2] / "bench" / "kernels" / "spills.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--max-stack", "128"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
