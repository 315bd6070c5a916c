"""`kernels.lora_pair`: both rank-r products of one operand, ``(M R, M^T L)``, from one read of ``M``."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.kernels.lora_pair import lora_pair
from tests.kernels._tolerance import kernel_device, needs_triton


def _inputs(n, k, r, r2, dtype, device, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(k, n, generator=g).t() if strided else torch.randn(n, k, generator=g)
    R = torch.randn(k, r, generator=g) / k**0.5
    L = torch.randn(n, r2, generator=g) / n**0.5
    return [t.to(device, dtype) for t in (M, R, L)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "n,k,r,r2,strided",
    [(70, 300, 5, 5, False), (33, 64, 16, 16, True), (1, 40, 3, 7, False), (130, 31, 20, 20, False)],
)
def test_pair_matches_both_products(dtype, n, k, r, r2, strided):
    # Odd sizes (partial tiles on both axes, several row and column blocks), a transposed M, ranks that differ and
    # one above 16: each product within fp32 summation error of fp64 on the same (rounded) inputs, then one
    # rounding to its dtype.
    device = kernel_device()
    M, R, L = _inputs(n, k, r, r2, dtype, device, strided)
    P, Q = lora_pair(M, R, L, p_dtype=dtype, q_dtype=torch.float32)
    assert P.shape == (n, r) and P.dtype == dtype and P.is_contiguous()
    assert Q.shape == (k, r2) and Q.dtype == torch.float32 and Q.is_contiguous()
    p_ref = (M.double() @ R.double()).to(dtype)
    q_ref = M.double().t() @ L.double()
    ulp = 2**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(P.double(), p_ref.double(), rtol=ulp, atol=ulp * p_ref.abs().max().item())
    torch.testing.assert_close(Q.double(), q_ref, rtol=1e-5, atol=1e-5 * q_ref.abs().max().item())


@needs_triton
def test_pair_is_deterministic_and_refuses_shapes_that_do_not_chain():
    device = kernel_device()
    M, R, L = _inputs(97, 80, 8, 8, torch.bfloat16, device, seed=2)
    a = lora_pair(M, R, L, torch.bfloat16, torch.float32)
    b = lora_pair(M, R, L, torch.bfloat16, torch.float32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # partial sums added in a fixed order
    with pytest.raises(ValueError, match="do not chain"):
        lora_pair(M, R[:-1], L, torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="do not chain"):
        lora_pair(M, R, L[:-1], torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="neither"):
        lora_pair(M, None, None, torch.bfloat16, torch.float32)


@needs_triton
def test_one_product_alone_has_the_paired_bits():
    # Asked for one product, the kernel walks the same tiles in the same order: the backward's paths that cannot
    # pair (a lean recompute forms H A_d^T after dY's products) give the same bits as those that do.
    device = kernel_device()
    M, R, L = _inputs(150, 290, 16, 16, torch.bfloat16, device, seed=4)
    P, Q = lora_pair(M, R, L, torch.bfloat16, torch.float32)
    P1, none1 = lora_pair(M, R, None, torch.bfloat16, torch.float32)
    none2, Q1 = lora_pair(M, None, L, torch.bfloat16, torch.float32)
    assert none1 is None and none2 is None
    assert torch.equal(P, P1) and torch.equal(Q, Q1)


@pytest.mark.gpu
def test_pair_at_llama_shapes_on_the_gpu():
    # 8192 x 14336 (dG of a 4x2048 Llama-3.1-8B layer) and 8192 x 4096: against cuBLAS's fp32-output products.
    for k in (14336, 4096):
        M, R, L = _inputs(8192, k, 16, 16, torch.bfloat16, "cuda", seed=k)
        P, Q = lora_pair(M, R, L, torch.bfloat16, torch.float32)
        p_ref = torch.mm(M, R, out_dtype=torch.float32)
        q_ref = torch.mm(M.t(), L, out_dtype=torch.float32)
        torch.testing.assert_close(P.float(), p_ref, rtol=2**-8, atol=2**-8 * p_ref.abs().max().item())
        torch.testing.assert_close(Q, q_ref, rtol=1e-4, atol=1e-4 * q_ref.abs().max().item())
