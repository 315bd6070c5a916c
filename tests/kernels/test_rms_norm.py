"""RMSNorm kernel against reference.rms_norm: output, dx and dw in fp32 and bf16, odd and strided shapes."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.kernels import reference
from raytune_llm.kernels.rms_norm import rms_norm
from tests.kernels._tolerance import check_against_reference, kernel_device, needs_triton

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
@pytest.mark.parametrize("h", [4096, 8192])
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
