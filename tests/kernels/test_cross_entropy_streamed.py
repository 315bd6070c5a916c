"""Streamed LM-head cross-entropy (head read chunk by chunk, online softmax) against the reference.

Covers fp32 and bf16, one and several chunks (a short last one), ignored labels (some and all), a strided hidden,
a scaled loss, a later chunk whose logits pass the first chunk's by more than the rescale margin (the rows'
accumulators rescaled in the row kernel), confident tokens, a label outside the vocabulary (NaN loss and gradient
row), the forward without a gradient, and on the GPU: a head in pinned host memory at Llama-3 sizes, the same step
recorded in a CUDA graph, and the device memory it saves. A second backward: tests/kernels/test_cross_entropy.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from raytune_llm.kernels import reference
from raytune_llm.kernels.cross_entropy import fused_linear_cross_entropy
from raytune_llm.kernels.cross_entropy_streamed import streamed_cross_entropy_forward, streamed_linear_cross_entropy
from tests.kernels._tolerance import check_against_reference, kernel_device, needs_triton
from tests.kernels.test_cross_entropy import _inputs

DTYPES = [torch.float32, torch.bfloat16]


def _streamed(chunk, scale=1.0):
    return lambda h, w, y: scale * streamed_linear_cross_entropy(h, w.detach(), y, -100, chunk)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v,chunk", [(1, 8, 16, None), (7, 12, 37, 8), (16, 24, 100, 32), (5, 16, 64, 64)])
def test_streamed_matches_reference(dtype, n, h, v, chunk):
    hidden, weight, labels = _inputs(n, h, v, kernel_device())
    check_against_reference(
        _streamed(chunk),
        reference.fused_linear_cross_entropy,
        [hidden, weight, labels],
        dtype,
        names=["h", "w", "y"],
        no_grad=(1,),
    )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_streamed_strided_hidden_scaled_loss(dtype):
    hidden, weight, labels = _inputs(9, 2 * 20, 50, kernel_device(), seed=1)
    check_against_reference(
        _streamed(16, 2.5),
        lambda h, w, y: 2.5 * reference.fused_linear_cross_entropy(h, w, y),
        [hidden, weight[:, :20].contiguous(), labels],
        dtype,
        views=[lambda t: t[:, ::2], None, None],
        no_grad=(1,),
    )


@needs_triton
def test_streamed_rescales_rows_whose_later_chunk_passes_the_first():
    # Rows of the third chunk get logits ~40 nats above the first chunk's: the running reference moves (and each
    # row's accumulator is rescaled) in the row kernel; the result must still match.
    hidden, weight, labels = _inputs(6, 16, 48, kernel_device(), ignore_frac=0.0, seed=5)
    weight[32:40] = hidden[0].sign() * 10.0  # aligned with every row's sign pattern of row 0: large logits
    labels[0] = 35
    check_against_reference(
        _streamed(16), reference.fused_linear_cross_entropy, [hidden, weight, labels], torch.float32, no_grad=(1,)
    )
    z = hidden.float() @ weight.float().t()
    assert (z[:, 32:40].max(1).values - z[:, :16].max(1).values).max() > 20  # the case really happened


@needs_triton
def test_streamed_rescale_keeps_what_came_before():
    # Row 0's first chunk peaks at 0; its second chunk at +19.5 (no rescale) holds the label; its third at +20.5
    # moves the reference and rescales the row's l, l' and accumulator by e^-20.5 (~1.2e-9 of their values, which
    # then still count against the new terms). A rescale that dropped the old state would lose the label's chunk.
    gen = torch.Generator().manual_seed(7)
    h, v = 8, 48
    hidden = torch.zeros(2, h)
    hidden[:, 0] = 1.0
    weight = torch.randn(v, h, generator=gen) * 0.01
    weight[:, 0] = 0.0
    weight[20, 0], weight[21, 0], weight[40, 0] = 19.5, 19.5, 20.5
    labels = torch.tensor([20, 40])
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(
            _streamed(16), reference.fused_linear_cross_entropy, [hidden, weight, labels], dtype, no_grad=(1,)
        )


@needs_triton
def test_streamed_confident_tokens_keep_their_gradient():
    # p_y close to 1: dL/dh = (p - onehot) W is small and must not drown in the rounding of p_y W_y (the label's
    # column stays out of the bf16 GEMM). Each row's error against an fp32 reference, relative to the row's own
    # gradient, stays within 2x that of the device path (kernels.cross_entropy), for 1 - p_y from 1e-2 to 3e-5.
    gen = torch.Generator().manual_seed(8)
    n, h, v = 8, 64, 256
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.05
    labels = torch.arange(n) * 7
    margins = torch.linspace(5.0, 16.0, n)  # logit of the label above the rest: 1 - p_y ~ 255 e^-margin
    weight[labels] += margins[:, None] * hidden / hidden.norm(dim=1, keepdim=True) ** 2
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    ref_h = hb.float().requires_grad_()
    reference.fused_linear_cross_entropy(ref_h, wb.float(), labels).backward()
    errors = {}
    for name, fn in (("streamed", streamed_linear_cross_entropy), ("device", fused_linear_cross_entropy)):
        x = hb.clone().requires_grad_()
        fn(x, wb, labels).backward()
        errors[name] = ((x.grad.float() - ref_h.grad).norm(dim=1) / ref_h.grad.norm(dim=1)).max().item()
    assert errors["streamed"] <= 2 * errors["device"] + 1e-3, errors


@needs_triton
def test_streamed_all_ignored_and_no_gradient():
    hidden, weight, labels = _inputs(4, 8, 16, kernel_device(), ignore_frac=1.1)
    h = hidden.clone().requires_grad_()
    loss = streamed_linear_cross_entropy(h, weight, labels, -100, 8)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0
    hidden, weight, labels = _inputs(5, 8, 30, kernel_device(), seed=2)
    loss, grad = streamed_cross_entropy_forward(hidden, weight, labels, -100, False, 8)
    assert grad is None
    assert abs(loss.item() - reference.fused_linear_cross_entropy(hidden, weight, labels).item()) < 1e-5


@needs_triton
def test_streamed_label_outside_the_vocabulary_gives_nan_loss():
    hidden, weight, labels = _inputs(3, 8, 16, kernel_device(), ignore_frac=0.0)
    labels[1] = 16
    h = hidden.clone().requires_grad_()
    loss = streamed_linear_cross_entropy(h, weight, labels, -100, 8)
    loss.backward()
    assert math.isnan(loss.item())
    assert h.grad[1].isnan().all() and not h.grad[0].isnan().any()  # that row's gradient says so too


def test_streamed_rejects_bad_input():
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must be"):
        streamed_linear_cross_entropy(h, w, y[:2])
    with pytest.raises(ValueError, match="need hidden"):
        streamed_linear_cross_entropy(h, torch.randn(5, 3), y)
    with pytest.raises(ValueError, match="frozen"):
        streamed_linear_cross_entropy(h, w.requires_grad_(), y)
    with pytest.raises(ValueError, match="vocab_chunk"):
        streamed_linear_cross_entropy(h, w.detach(), y, -100, 0)
    with pytest.raises(ValueError, match="vocab_chunk"):
        streamed_linear_cross_entropy(h, w.detach(), y, -100, 2**17)
    with pytest.raises(ValueError, match="no rows"):
        streamed_linear_cross_entropy(h, torch.randn(0, 4), y)
    with pytest.raises(ValueError, match="unit column stride"):
        streamed_linear_cross_entropy(h, torch.randn(4, 5)[:, ::1].t(), y)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        streamed_linear_cross_entropy(h, w.detach().bfloat16(), y)


def _gpu_pair(n, h, v, seed=0):
    hidden, weight, labels = _inputs(n, h, v, torch.device("cuda"), seed=seed)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    return hidden, weight, weight.cpu().pin_memory(), labels


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2048, 8192])
def test_streamed_host_head_matches_reference_at_llama_sizes(n):
    # The head in pinned host memory, 128256 x 4096: the chunks come over on the side stream. Judged by the bf16
    # rule against the reference on the device copy of the same head; the loss scaled to O(1) gradients (a power
    # of two, exact in bf16).
    hidden, weight, host, labels = _gpu_pair(n, 4096, 128256)
    count = 2.0 ** round(math.log2(int((labels != -100).sum())))
    check_against_reference(
        lambda a, b, c: count * streamed_linear_cross_entropy(a, host, c),
        lambda a, b, c: count * reference.fused_linear_cross_entropy(a, b, c),
        [hidden, weight, labels],
        torch.bfloat16,
        no_grad=(1,),
    )


@pytest.mark.gpu
def test_streamed_uses_the_fp32_output_gemm_and_saves_the_head(monkeypatch):
    # The accumulator's GEMM writes fp32 itself (no fp32 copies of the chunks), and the step's extra device memory
    # at 8192 tokens is well under the 1,002 MiB head it leaves on the host.
    out_dtypes = []
    for name in ("mm", "addmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(
            torch, name, lambda *a, _real=real, **kw: out_dtypes.append(kw.get("out_dtype")) or _real(*a, **kw)
        )
    hidden, weight, host, labels = _gpu_pair(8192, 4096, 128256, seed=1)
    del weight
    h = hidden.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    streamed_linear_cross_entropy(h, host, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert out_dtypes.count(torch.float32) >= 128256 // 4096  # one accumulating GEMM per head chunk at least
    assert extra < 400 * 2**20, f"extra peak {extra / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_streamed_host_head_in_a_cuda_graph_replays_the_eager_result():
    # Recorded once and replayed on new inputs: the copies, events and kernels replay; same bits as eager.
    hidden, weight, host, labels = _gpu_pair(2048, 4096, 128256, seed=2)
    del weight
    static_h = hidden.clone()
    static_y = labels.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        streamed_cross_entropy_forward(static_h, host, static_y, -100, True)  # warm-up: compiles the kernels
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_loss, g_grad = streamed_cross_entropy_forward(static_h, host, static_y, -100, True)
    new_h, _, _, new_y = _gpu_pair(2048, 4096, 128256, seed=3)
    static_h.copy_(new_h)
    static_y.copy_(new_y)
    graph.replay()
    loss, grad = streamed_cross_entropy_forward(new_h, host, new_y, -100, True)
    torch.cuda.synchronize()
    assert torch.equal(g_loss, loss) and torch.equal(g_grad, grad)


@pytest.mark.gpu
def test_streamed_loss_agrees_with_the_device_path():
    # Same head on the device (kernels.cross_entropy) and on the host (streamed): losses within fp32 rounding,
    # gradients within one bf16 rounding of each other's scale.
    hidden, weight, host, labels = _gpu_pair(4096, 4096, 128256, seed=4)
    a = hidden.clone().requires_grad_()
    b = hidden.clone().requires_grad_()
    la = fused_linear_cross_entropy(a, weight, labels)
    lb = streamed_linear_cross_entropy(b, host, labels)
    (la * 4096).backward()
    (lb * 4096).backward()
    assert abs(la.item() - lb.item()) <= 1e-5 * abs(la.item()) + 1e-6
    assert (a.grad.float() - b.grad.float()).abs().max() <= 2**-7 * a.grad.float().abs().max()
