"""models.attention_stash against a plain recompute, with an attention made of several ops."""

from __future__ import annotations

import pytest
import torch

from raytune_llm.models import attention_stash
from raytune_llm.models.checkpointing import OffloadChain, checkpoint_layer


def _chained_attention(q, k, v):
    # Several autograd nodes, each saving a tensor the next op no longer needs: sigmoid saves its output, which
    # is freed once the product is formed, so a later saved tensor may land on the same address (it does under
    # CUDA's caching allocator, as with SDPA's math path; glibc on the CPU did not reuse one in this test).
    c = q
    for _ in range(4):  # each sigmoid output is freed (by Python) once the next product exists
        c = torch.sigmoid(c * 2.0)
    scores = torch.softmax((c @ k.transpose(-1, -2)) * k.shape[-1] ** -0.5, dim=-1)
    return (scores @ v).transpose(1, 2)


def _layer(weights):
    wq, wk, wv, wo = weights

    def run(h):
        b, s, _ = h.shape
        q, k, v = ((h @ w).view(b, s, 2, -1).transpose(1, 2) for w in (wq, wk, wv))
        a = attention_stash.run(_chained_attention, q, k, v).reshape(b, s, -1)
        return h + a @ wo

    return run


def test_stash_of_a_multi_op_attention_gives_the_recompute_gradients():
    # Each saved tensor is copied once per storage; a storage freed during the attention call must not be
    # mistaken for a later one at the same address (the stash keeps them alive until the call ends). On the GPU
    # the fp32 lean-Q/K/V kernel test (SDPA's math path) is the one that caught it.
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 8, generator=gen).requires_grad_() for _ in range(4)]
    x0 = torch.randn(2, 5, 8, generator=gen)

    def grads(stash):
        for w in weights:
            w.grad = None
        x = x0.clone().requires_grad_()
        chain, y = OffloadChain(), x
        for _ in range(3):
            y = checkpoint_layer(_layer(weights), y, offload=True, chain=chain, stash=stash)
        y.square().sum().backward()
        return [x.grad] + [w.grad for w in weights]

    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not attention_stash._mode


def test_replay_refuses_a_recompute_that_calls_attention_differently():
    stashes: list = []
    q = torch.randn(1, 2, 3, 4)
    with attention_stash.recording(stashes, side_stream=None):
        attention_stash.run(_chained_attention, q, q, q)
    try:
        with attention_stash.replaying(stashes):
            pass
    except RuntimeError as exc:
        assert "made 0 attention calls, the forward 1" in str(exc)
    else:
        raise AssertionError("a replay with a missing attention call passed")


def test_a_forward_without_backward_frees_its_stashes(monkeypatch):
    # The kept graph's saved-tensor hooks must not hold the object that holds the graph's edges: that cycle runs
    # through C++ nodes Python's collector cannot see, so the host copies of a forward never followed by its
    # backward (an exception in a later layer, an evaluation with grad on) would stay for good.
    import gc
    import weakref

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 8, generator=gen).requires_grad_() for _ in range(4)]
    refs = []
    real_init = attention_stash.AttentionStash.__init__

    def tracked(self, *a, **k):
        real_init(self, *a, **k)
        refs.append(weakref.ref(self))

    monkeypatch.setattr(attention_stash.AttentionStash, "__init__", tracked)
    y = torch.randn(2, 5, 8, generator=gen).requires_grad_()
    chain = OffloadChain()
    for _ in range(3):
        y = checkpoint_layer(_layer(weights), y, offload=True, chain=chain, stash=True)
    assert len(refs) == 3 and all(r() is not None for r in refs)
    del y, chain
    gc.collect()
    assert [r() for r in refs] == [None] * 3, "a stash outlived its graph"


def test_stashed_parameters_are_copied_alone_not_the_buffer_they_view():
    # Trained tensors handed to the stash (the O adapter) may be views of one flat buffer (DeepSpeed's bf16 ZeRO-2
    # flattens every trainable parameter into one): the kept graph must save copies of them alone, not the buffer.
    flat = torch.zeros(100_000, requires_grad=True)
    a, b = flat[:64].view(4, 16), flat[64:96].view(8, 4)
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    stashes: list = []

    def attn_o(q, k, v, a, b):
        return (_chained_attention(q, k, v).reshape(1, 3, -1) @ a.t()) @ b.t()

    with attention_stash.recording(stashes, side_stream=None):
        attention_stash.run(attn_o, q, q, q, params=(a, b))
    kept = sum(host.numel() for host, _ in stashes[0].copies._host.values())
    assert kept < flat.numel() * flat.element_size() // 10, kept


def test_the_last_layer_on_the_device_copies_nothing_and_gives_the_same_gradients(monkeypatch):
    # on_device keeps the layer's input and stash storages themselves (its backward runs first): no host copy is
    # made for them, and the gradients are those of the fully offloaded chain.
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 8, generator=gen).requires_grad_() for _ in range(4)]
    x0 = torch.randn(2, 5, 8, generator=gen)
    copies = [0]
    real = attention_stash.HostCopies._to_host
    monkeypatch.setattr(
        attention_stash.HostCopies,
        "_to_host",
        lambda self, raw: copies.__setitem__(0, copies[0] + 1) or real(self, raw),
    )

    def grads(last_on_device):
        for w in weights:
            w.grad = None
        copies[0] = 0
        x = x0.clone().requires_grad_()
        chain, y = OffloadChain(), x
        for i in range(3):
            last = last_on_device and i == 2
            inp = y
            y = checkpoint_layer(_layer(weights), y, offload=True, chain=chain, stash=True, on_device=last)
        kept = chain._slots[-1].copies._host
        same = all(buf.data_ptr() == inp.data_ptr() for buf, _ in kept.values())
        made = copies[0]
        y.square().sum().backward()
        return made, same, [x.grad] + [w.grad for w in weights]

    made_off, same_off, g_off = grads(False)
    made_on, same_on, g_on = grads(True)
    assert same_on and not same_off  # the last layer keeps its very input storage, not a copy
    assert made_on * 3 == made_off * 2  # one layer of three made no host copies at all
    for got, want in zip(g_on, g_off):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pinned_pieces_are_powers_of_two_that_add_up_to_the_copy():
    # torch's pinned allocator rounds each block up to a power of two; the pieces waste at most 1/32 of the copy
    # (the last one, below the largest's 1/32), against up to all of it for one block (1.75 GiB took 2).
    pieces = attention_stash.pinned_pieces
    assert pieces(7 << 28) == [1 << 30, 1 << 29, 1 << 28]  # a host-kept gate output at 65,536 tokens of 8B
    assert pieces(1 << 30) == [1 << 30] and pieces(3 << 18) == [3 << 18]  # a power of two; small: one block
    for n in [(1 << 20) + 1, 65_537 * 14_336 * 2, 3 * 5 * 7 * 11 * 13 * 17 * 19, (1 << 40) - 1]:
        got = pieces(n)
        allocated = sum(1 << (p - 1).bit_length() for p in got)
        assert sum(got) == n and allocated <= n + n // 32, (n, got)
        assert all(p & (p - 1) == 0 for p in got[:-1]) and len(got) <= 7


@pytest.mark.gpu
def test_a_host_copy_in_pieces_comes_back_the_same_bits():
    # A storage of 7 MiB + 3 bytes: pinned pieces of 4, 2 and 1 MiB and one of 3 bytes, each pinned; back on the
    # device the same bytes, at the same storage offset and strides.
    side = torch.cuda.Stream()
    n = (7 << 20) + 3
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    view = src[5:].view(-1)
    copies = attention_stash.HostCopies(lambda device: side)
    handle = copies.pack(view)
    ((bufs, done),) = copies._host.values()
    assert [b.numel() for b in bufs] == [4 << 20, 2 << 20, 1 << 20, 3] and all(b.is_pinned() for b in bufs)
    copies.end_packing()
    copies.prefetch()
    back = copies.unpack(handle)
    assert back.storage_offset() == 5 and torch.equal(back, view)
    attention_stash.release_copied(everything=True)  # end_packing queued the storage for release: let it go
