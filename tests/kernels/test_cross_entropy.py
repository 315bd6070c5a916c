"""Fused linear cross-entropy against reference.fused_linear_cross_entropy: loss, d hidden, d weight.

Covers fp32 and bf16, a single token, odd widths, several chunks, ignored labels (some and all),
a frozen head (no weight gradient), a strided hidden, non-unit upstream gradients (frozen and trained head), a
unit one (the forward's gradients handed on untouched), and a vocabulary
wider than one kernel block (the online-softmax loop).
"""

from __future__ import annotations

import math

import pytest
import torch

from raytune_llm.kernels import reference
from raytune_llm.kernels.cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_forward,
)
from tests.kernels._tolerance import check_against_reference, compile_for_sm90, kernel_device, needs_triton

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(n, h, v, device, ignore_frac=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5 * 2
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    return hidden.to(device), weight.to(device), labels.to(device)


def _chunked(chunk):
    return lambda h, w, y: fused_linear_cross_entropy(h, w, y, -100, chunk)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v,chunk", [(1, 8, 16, None), (7, 12, 37, 3), (16, 24, 100, 5), (5, 16, 64, 1)])
def test_flce_matches_reference(dtype, n, h, v, chunk):
    hidden, weight, labels = _inputs(n, h, v, kernel_device())
    check_against_reference(
        _chunked(chunk), reference.fused_linear_cross_entropy, [hidden, weight, labels], dtype, names=["h", "w", "y"]
    )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_flce_frozen_head_strided_hidden_scaled_loss(dtype):
    # The LoRA case: the head is frozen (no weight gradient is made); hidden is a strided slice; loss * 2.5.
    hidden, weight, labels = _inputs(9, 2 * 20, 50, kernel_device(), seed=1)

    def kern(h, w, y):
        assert w.grad_fn is None and not w.requires_grad
        return 2.5 * fused_linear_cross_entropy(h, w, y, -100, 4)

    def ref(h, w, y):
        return 2.5 * reference.fused_linear_cross_entropy(h, w, y)

    check_against_reference(
        kern,
        ref,
        [hidden, weight[:, :20].contiguous(), labels],
        dtype,
        views=[lambda t: t[:, ::2], None, None],
        no_grad=(1,),
    )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_flce_trained_head_scaled_loss(dtype):
    # A trained head's dL/dW is scaled in the backward too (the device-side kernel; the scale is not 1).
    hidden, weight, labels = _inputs(11, 16, 40, kernel_device(), seed=3)
    check_against_reference(
        lambda h, w, y: 0.3 * fused_linear_cross_entropy(h, w, y, -100, 4),
        lambda h, w, y: 0.3 * reference.fused_linear_cross_entropy(h, w, y),
        [hidden, weight, labels],
        dtype,
    )


@needs_triton
def test_flce_unit_upstream_gradient_leaves_the_forward_gradients_as_made():
    # grad_output == 1 (a loss's own backward): the backward hands on exactly what the forward made.
    hidden, weight, labels = _inputs(10, 16, 40, kernel_device(), seed=4)
    _, gh, gw = fused_linear_cross_entropy_forward(hidden, weight, labels, -100, 3, True, True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_linear_cross_entropy(h, w, labels, -100, 3).backward()
    assert torch.equal(h.grad, gh) and torch.equal(w.grad, gw)


@needs_triton
def test_flce_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, labels = _inputs(4, 8, 16, kernel_device(), ignore_frac=1.1)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert h.grad.abs().max().item() == 0.0 and w.grad.abs().max().item() == 0.0


@needs_triton
def test_flce_vocab_wider_than_one_block():
    # 33000 > the 32768-entry block: the online max/sum must carry across loop steps.
    hidden, weight, labels = _inputs(3, 8, 33000, kernel_device(), ignore_frac=0.0, seed=2)
    weight = weight * 3  # spread the logits so the running max moves between blocks
    check_against_reference(_chunked(2), reference.fused_linear_cross_entropy, [hidden, weight, labels], torch.float32)


@needs_triton
@pytest.mark.parametrize("fn", ["fused", "streamed"])
def test_flce_second_backward_raises(fn):
    # Both losses make their gradients in the forward (the streamed one: kernels.cross_entropy_streamed).
    from raytune_llm.kernels.cross_entropy_streamed import streamed_linear_cross_entropy

    loss_fn = fused_linear_cross_entropy if fn == "fused" else streamed_linear_cross_entropy
    hidden, weight, labels = _inputs(3, 8, 16, kernel_device())
    loss = loss_fn(hidden.clone().requires_grad_(), weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_flce_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must be"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="need hidden"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer ids"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3))


def test_default_chunk_size_follows_the_memory_rule():
    # Llama-3 at 32768 tokens: logits chunk [1024, 128256] ~ the size of the [32768, 4096] hidden states.
    assert default_chunk_size(32768, 4096, 128256) == 1024
    assert default_chunk_size(8192, 4096, 128256) == 256
    assert default_chunk_size(1, 4096, 128256) == 1


def test_flce_weight_gradient_keeps_the_weight_dtype():
    # dL/dW is summed over 5 chunks in W's dtype: bf16 gradients, within 2% of the fp32 reference's largest entry.
    hidden, weight, labels = _inputs(20, 16, 50, kernel_device())
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    fused_linear_cross_entropy(h, w, labels, -100, 4).backward()
    assert w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16
    wf = weight.detach().float().requires_grad_()
    reference.fused_linear_cross_entropy(h.detach().float(), wf, labels).backward()
    assert (w.grad.float() - wf.grad).abs().max() <= 0.02 * wf.grad.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("h", [4096, 8192])
@pytest.mark.parametrize("head", ["frozen", "train"])
def test_flce_real_sizes(dtype, h, head):
    hidden, weight, labels = _inputs(2048, h, 128256, torch.device("cuda"))
    # The loss is scaled by about the token count so gradients are O(1) (mean-reduced ones are ~1e-6 at this
    # size, where the fp32 atol of 1e-5 would pass anything). The scale is a power of two, exact in bf16: the
    # fused op applies the upstream gradient to its stored bf16 dL/dh, one rounding more than autograd's order
    # for other scales (see the module docstring), which is not what this test measures.
    # dW accumulates over the chunks in W's dtype (one rounding per chunk); 256-token chunks make 8 of them, as
    # many as 32768 tokens in the trained-head default's chunks.
    count = 2.0 ** round(math.log2(int((labels != -100).sum())))
    chunk = 256 if head == "train" else None
    check_against_reference(
        lambda a, b, c: count * fused_linear_cross_entropy(a, b, c, -100, chunk),
        lambda a, b, c: count * reference.fused_linear_cross_entropy(a, b, c),
        [hidden, weight, labels],
        dtype,
        no_grad=(1,) if head == "frozen" else (),
    )


@pytest.mark.gpu
def test_flce_peak_memory_below_full_logits():
    # 8192 tokens x 128256 vocab in bf16: full logits alone would be 2 GiB (4 GiB as fp32).
    dev = torch.device("cuda")
    hidden, weight, labels = _inputs(8192, 4096, 128256, dev)
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_linear_cross_entropy(h, w, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1.0 * 2**30, f"extra peak {extra / 2**30:.2f} GiB"


@pytest.mark.slow
def test_ce_kernel_compiles_for_sm90_without_spills(tmp_path):
    sig = {"LOGITS_ptr": "*bf16", "stride_l": "i32", "LABELS_ptr": "*i64", "LOSS_ptr": "*fp32", "DENOM_ptr": "*fp32"}
    sig |= {"n_cols": "i32", "ignore_index": "i32"}
    mod = "raytune_llm.kernels.cross_entropy"
    lines = compile_for_sm90(
        [(mod, "_ce_row_kernel", sig, {"COMPUTE_GRAD": g, "BLOCK": 32768}, 32) for g in (False, True)],
        tmp_path,
    )
    assert len(lines) == 2 and all("LOCAL:0" in line for line in lines), lines
