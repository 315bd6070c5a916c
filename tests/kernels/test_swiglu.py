"""SwiGLU kernel against reference.swiglu: output, d gate and d up in fp32 and bf16, odd and strided shapes."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.kernels import reference
from raytune_llm.kernels.swiglu import swiglu
from tests.kernels._tolerance import check_against_reference, compile_for_sm90, kernel_device, needs_triton

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Scale 3 so the sigmoid's saturated tails (|a| > 5) are exercised too.
    return (3 * torch.randn(*shape, generator=gen)).to(device), torch.randn(*shape, generator=gen).to(device)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 37), (2, 3, 96), (2, 2100)])
def test_swiglu_matches_reference(dtype, shape):
    gate, up = _inputs(shape, kernel_device())
    check_against_reference(swiglu, reference.swiglu, [gate, up], dtype, names=["gate", "up"])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_fused_projection_halves(dtype):
    # gate and up as the two halves of one fused gate_up projection: row stride 2*I, no copy.
    dev = kernel_device()
    gen = torch.Generator().manual_seed(1)
    gate_up = (2 * torch.randn(2, 5, 2 * 40, generator=gen)).to(dev)

    def kern(gu):
        g, u = gu.chunk(2, dim=-1)
        assert not g.is_contiguous()
        return swiglu(g, u)

    def ref(gu):
        g, u = gu.chunk(2, dim=-1)
        return reference.swiglu(g, u)

    check_against_reference(kern, ref, [gate_up], dtype, names=["gate_up"])


@needs_triton
def test_swiglu_transposed_input():
    # Column stride != 1 takes a contiguous copy; the result must still match.
    dev = kernel_device()
    gate, up = _inputs((9, 4), dev, seed=2)
    check_against_reference(
        swiglu, reference.swiglu, [gate, up], torch.float32, views=[lambda t: t.t(), lambda t: t.t()]
    )


@needs_triton
def test_swiglu_backward_writes_over_intermediates_and_guards_them():
    # gate/up made by an op (not leaves): the gradients are written over them, nothing new is allocated for
    # them, and a second backward through the same graph fails instead of reading gradients as activations.
    dev = kernel_device()
    g0, u0 = (t.requires_grad_() for t in _inputs((3, 40), dev, seed=3))
    gate, up = g0 * 1.0, u0 * 1.0
    gptr, uptr = gate.data_ptr(), up.data_ptr()
    dc = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)).to(dev)
    out = swiglu(gate, up)
    (out * dc).sum().backward(retain_graph=True)
    g_ref, u_ref = (t.detach().clone().requires_grad_() for t in (g0, u0))
    (reference.swiglu(g_ref, u_ref) * dc).sum().backward()
    torch.testing.assert_close(g0.grad, g_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u0.grad, u_ref.grad, rtol=1e-5, atol=1e-5)
    assert (gate.data_ptr(), up.data_ptr()) == (gptr, uptr)
    torch.testing.assert_close(gate.detach(), g_ref.grad)  # gate now holds its gradient
    with pytest.raises(RuntimeError, match="inplace operation"):
        (out * dc).sum().backward()


@needs_triton
def test_swiglu_leaves_and_one_tensor_twice_are_not_overwritten():
    dev = kernel_device()
    gate, up = (t.requires_grad_() for t in _inputs((2, 24), dev, seed=5))
    keep = gate.detach().clone(), up.detach().clone()
    swiglu(gate, up).sum().backward()
    swiglu(gate.view(4, 12), up[:, :].view(4, 12)).sum().backward()  # views of leaves: still the user's storage
    assert torch.equal(gate.detach(), keep[0]) and torch.equal(up.detach(), keep[1])
    # The same intermediate as gate and up: d gate and d up must not land on one buffer.
    x0 = _inputs((2, 24), dev, seed=6)[0].requires_grad_()
    x = x0 * 1.0
    swiglu(x, x).sum().backward()
    ref = x0.detach().clone().requires_grad_()
    reference.swiglu(ref, ref).sum().backward()
    torch.testing.assert_close(x0.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_swiglu_rejects_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="cast one"):
        swiglu(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("inter", [14336, 28672])
def test_swiglu_real_sizes(dtype, inter):
    gate, up = _inputs((4096, inter), torch.device("cuda"))
    check_against_reference(swiglu, reference.swiglu, [gate, up], dtype, names=["gate", "up"])


@pytest.mark.slow
def test_swiglu_kernels_compile_for_sm90_without_spills(tmp_path):
    fwd = {"C_ptr": "*bf16", "A_ptr": "*bf16", "B_ptr": "*bf16", "stride_c": "i32", "stride_a": "i32"}
    fwd |= {"stride_b": "i32", "n_cols": "i32"}
    bwd = {"DA_ptr": "*bf16", "DB_ptr": "*bf16", "DC_ptr": "*bf16", "A_ptr": "*bf16", "B_ptr": "*bf16"}
    bwd |= {"stride_da": "i32", "stride_db": "i32", "stride_dc": "i32", "stride_a": "i32", "stride_b": "i32"}
    bwd |= {"n_cols": "i32"}
    mod = "raytune_llm.kernels.swiglu"
    lines = compile_for_sm90(
        [
            (mod, "_swiglu_fwd_kernel", fwd, {"BLOCK": 16384}, 32),
            (mod, "_swiglu_bwd_kernel", bwd, {"BLOCK": 8192}, 16),
            (mod, "_swiglu_bwd_kernel", bwd, {"BLOCK": 4096}, 8),
        ],
        tmp_path,
    )
    assert len(lines) == 3 and all("LOCAL:0" in line for line in lines), lines
