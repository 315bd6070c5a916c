"""RMSNorm kernel against reference.rms_norm: output, dx and dw in fp32 and bf16, odd and strided shapes."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.kernels import reference
from raytune_llm.kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_residual
from tests.kernels._tolerance import (
    check_against_reference,
    compile_for_sm90,
    kernel_device,
    needs_triton,
    patched_step,
    tiny_bf16_llama,
)

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape, h, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, h, generator=gen).to(device)
    w = (1.0 + 0.1 * torch.randn(h, generator=gen)).to(device)
    return x, w


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,h", [((1,), 8), ((3,), 37), ((2, 5), 64), ((4,), 200)])
def test_rms_norm_matches_reference(dtype, shape, h):
    x, w = _inputs(shape, h, kernel_device())
    check_against_reference(rms_norm, reference.rms_norm, [x, w, 1e-6], dtype, names=["x", "w", "eps"])


@needs_triton
@pytest.mark.parametrize("rows", [2, 4])
def test_rms_norm_backward_tiles_of_rows(monkeypatch, rows):
    # The backward may walk its band of rows `rows` at a time; 9 rows over 4 programs make bands of 3
    # end inside a tile, whose rows past the band belong to the next program and must be left to it.
    from raytune_llm.kernels import rms_norm as mod

    monkeypatch.setitem(mod._BWD, "rows", rows)
    for shape, h in [((9,), 64), ((3, 5), 37), ((1,), 8)]:
        x, w = _inputs(shape, h, kernel_device(), seed=rows)
        check_against_reference(rms_norm, reference.rms_norm, [x, w, 1e-6], torch.float32, names=["x", "w", "eps"])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_non_contiguous(dtype):
    # A strided slice (row stride 2*H, unit column stride) and a transposed view (column stride != 1).
    x, w = _inputs((6,), 48, kernel_device(), seed=1)
    check_against_reference(rms_norm, reference.rms_norm, [x, w, 1e-5], dtype, views=[lambda t: t[::2], None, None])
    xt = torch.randn(5, 24, generator=torch.Generator().manual_seed(2)).to(kernel_device())
    w2 = w[:5].contiguous()
    check_against_reference(rms_norm, reference.rms_norm, [xt, w2, 1e-5], dtype, views=[lambda t: t.t(), None, None])


def test_rms_norm_rejects_wrong_weight():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.ones(7))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("h", [4096, 8192, 16384])  # 16384: fp32 rows too wide for the pipelined backward
def test_rms_norm_real_sizes(dtype, h):
    x, w = _inputs((2, 1024), h, torch.device("cuda"))
    check_against_reference(rms_norm, reference.rms_norm, [x, w, 1e-5], dtype, names=["x", "w", "eps"])


def test_use_triton_dispatch(monkeypatch):
    # The one dispatch rule every functional follows: CUDA tensors or TRITON_INTERPRET=1 -> Triton.
    from raytune_llm.kernels._dispatch import row_block_settings, use_triton

    cpu = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(cpu) and not use_triton()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cpu, None)
    assert row_block_settings(4096) == (4096, 8) and row_block_settings(37) == (64, 4)
    with pytest.raises(ValueError, match="exceeds"):
        row_block_settings(70000)


@pytest.mark.slow
def test_rms_norm_kernels_compile_for_sm90_without_spills(tmp_path):
    fwd = {"Y_ptr": "*bf16", "X_ptr": "*bf16", "W_ptr": "*bf16", "RSTD_ptr": "*fp32"}
    fwd |= {"A_ptr": "*bf16", "H_ptr": "*bf16"}
    fwd |= {"stride_y": "i32", "stride_x": "i32", "stride_a": "i32", "stride_h": "i32", "n_cols": "i32", "eps": "fp32"}
    bwd = {"DX_ptr": "*bf16", "DW_PART_ptr": "*fp32", "DY_ptr": "*bf16", "X_ptr": "*bf16", "W_ptr": "*bf16"}
    bwd |= {"RSTD_ptr": "*fp32", "DR_ptr": "*bf16", "stride_dx": "i32", "stride_dy": "i32", "stride_x": "i32"}
    bwd |= {"stride_dr": "i32", "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32"}
    mod = "raytune_llm.kernels.rms_norm"
    kernels = []
    for fused in (False, True):  # the plain norm, and with the residual add (forward) / gradient (backward)
        f = {"HAS_ADD": fused, "RNE_BF16": False}
        b = {"ROWS": 1, "HAS_RES": fused, "RNE_BF16": False}
        kernels += [
            (mod, "_rms_norm_fwd_kernel", fwd, {"BLOCK": 4096, **f}, 8),
            (mod, "_rms_norm_fwd_kernel", fwd, {"BLOCK": 8192, **f}, 16),
            (mod, "_rms_norm_bwd_kernel", bwd, {"BLOCK": 4096, "STAGES": 0, **b}, 8),
            (mod, "_rms_norm_bwd_kernel", bwd, {"BLOCK": 8192, "STAGES": 0, **b}, 32),
            (mod, "_rms_norm_bwd_kernel", bwd, {"BLOCK": 4096, "STAGES": 3, **b}, 8),
            (mod, "_rms_norm_bwd_kernel", bwd, {"BLOCK": 8192, "STAGES": 3, **b}, 32),
        ]
    lines = compile_for_sm90(kernels, tmp_path)
    assert len(lines) == 12 and all("LOCAL:0" in line for line in lines), lines


@needs_triton
def test_rms_norm_empty_batch():
    x = torch.randn(0, 16, device=kernel_device(), requires_grad=True)
    w = torch.ones(16, device=kernel_device(), requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert w.grad is not None and w.grad.abs().max().item() == 0.0


def _grads(fn, tensors, seed):
    """Outputs of ``fn(*leaves)`` and the leaves' gradients under a fixed random upstream gradient per output."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, ups)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _check_residual_norms(x, a, w, eps):
    """add_rms_norm against ``x + a`` then the norm, and rms_norm_residual against ``x`` used twice (its two
    gradients summed by autograd): outputs and every gradient equal bit for bit, dtypes included."""

    def separate(x, a, w):
        hh = x + a
        return hh, rms_norm(hh, w, eps)

    got = _grads(lambda x, a, w: add_rms_norm(x, a, w, eps), [x, a, w], seed=3)
    want = _grads(separate, [x, a, w], seed=3)
    for name, g, e in zip(["h", "y", "dx", "da", "dw"], got, want):
        assert g.dtype == e.dtype and torch.equal(g, e), f"{name}: max diff {(g.double() - e.double()).abs().max()}"
    got = _grads(lambda x, w: rms_norm_residual(x, w, eps), [x, w], seed=5)
    want = _grads(lambda x, w: (x * 1, rms_norm(x, w, eps)), [x, w], seed=5)
    for name, g, e in zip(["residual", "y", "dx", "dw"], got, want):
        assert g.dtype == e.dtype and torch.equal(g, e), f"{name}: max diff {(g.double() - e.double()).abs().max()}"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,h", [((3,), 37), ((2, 5), 64), ((9,), 200)])
def test_residual_norms_are_the_separate_add_and_norm_bit_for_bit(dtype, shape, h):
    # The decoder layer's `h = x + attn; y = norm(h)` with h also feeding the next residual add (its own gradient),
    # and the layer input feeding its norm and the residual add (autograd would add the two with an add kernel).
    dev = kernel_device()
    x, w = _inputs(shape, h, dev)
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dev)
    _check_residual_norms(x.to(dtype), a.to(dtype), w.to(dtype), 1e-6)


def test_add_rms_norm_rejects_mismatched_summands():
    x, w = _inputs((2,), 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="summands differ in shape"):
        add_rms_norm(x, x[:1], w)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,h", [(8192, 4096), (2048, 8192), (64, 16384)])
def test_residual_norms_bit_for_bit_at_training_widths(rows, h):
    # The GPU launches what the small shapes above do not: BLOCK 4096 and 8192 with the pipelined backward and its
    # third (residual-gradient) row, 16384 wide where that third row drops the pipeline, hundreds of programs.
    x, w = _inputs((rows,), h, torch.device("cuda"))
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).cuda()
    _check_residual_norms(x.bfloat16(), a.bfloat16(), w.bfloat16(), 1e-5)


@needs_triton
def test_fused_residuals_in_a_bf16_model_give_the_same_bits(tmp_path):
    # The whole patched model in bf16 with the fused kernels (the model tests run fp32 on the reference path):
    # offloaded checkpointing with the attention stash, so the recompute's value-less add runs too.
    from raytune_llm.models.settings import set_fused_residuals

    model, ids = tiny_bf16_llama(tmp_path)

    def step(fused):
        return patched_step(model, ids, setup=lambda m: set_fused_residuals(m, fused))

    import raytune_llm.kernels.rms_norm as rms_mod
    import raytune_llm.models.checkpointing as ckpt

    calls = {"norm": 0, "sum": 0}
    real_norm, real_sum = rms_mod.ResidualRMSNormFunction.apply, ckpt._SumWithoutValues.apply

    def norm(*a):
        calls["norm"] += 1
        return real_norm(*a)

    def valueless(*a):
        calls["sum"] += 1
        return real_sum(*a)

    rms_mod.ResidualRMSNormFunction.apply, ckpt._SumWithoutValues.apply = norm, valueless
    try:
        loss0, g0 = step(False)
        assert calls == {"norm": 0, "sum": 0}
        loss1, g1 = step(True)
    finally:
        rms_mod.ResidualRMSNormFunction.apply, ckpt._SumWithoutValues.apply = real_norm, real_sum
    n_layers = model.get_base_model().config.num_hidden_layers
    assert calls == {"norm": 4 * n_layers, "sum": n_layers}  # two norms a layer, forward and recompute
    assert torch.equal(loss1, loss0)
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("used", [0, 1], ids=["residual_only", "norm_only"])
def test_residual_norms_with_one_output_unused(dtype, used):
    # Backward with a gradient for one output only (the other's is None): the same gradients as the separate ops.
    dev = kernel_device()
    x, w = _inputs((9,), 64, dev)
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dev)
    x, a, w = x.to(dtype), a.to(dtype), w.to(dtype)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(dev, dtype)

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        fn(*leaves)[used].backward(gy)
        return [t.grad for t in leaves]

    def separate_add(x, a, w):
        hh = x + a
        return hh, rms_norm(hh, w, 1e-6)

    for got, want in (
        (grads(lambda x, a, w: add_rms_norm(x, a, w, 1e-6), x, a, w), grads(separate_add, x, a, w)),
        (grads(lambda x, w: rms_norm_residual(x, w, 1e-6), x, w), grads(lambda x, w: (x * 1, rms_norm(x, w)), x, w)),
    ):
        for g, e in zip(got, want):
            assert (g is None) == (e is None) and (g is None or torch.equal(g, e))
