"""Attention in a checkpointed layer's recompute, replayed from what its forward kept in host memory.

A checkpointed layer's backward runs the layer's forward again to rebuild what backward reads. For
attention that is the Q/K/V projections, RoPE and the attention forward, and all of it only to give
attention's backward its saved q, k, v, output and log-sum-exp again. On the H200 the attention forward
alone is 0.31 ms of a layer at 4x2048 tokens, 3.5 ms at 16,384 and 58 ms at 65,536
(bench/gpu/probe_attention.py), 1.4 %, 6 % and 13 % of a step. With a stash, under offloaded
checkpointing:

- forward (`recording`): attention runs with grad enabled on pass-through stand-ins of q, k and v. Every
  tensor its autograd nodes save goes through `saved_tensors_hooks` to pinned host memory (copied on the
  side stream, once per storage, so views share a copy), and so does the attention result. What stays
  is the graph: the edge of the result and the edges of the three stand-ins. The stand-ins are outputs
  of a pass-through Function over a zero-size anchor, so no node holds q, k or v's device memory.
- the layer's backward prefetches the stash with the layer's input (`models.checkpointing.OffloadChain`).
- recompute (`replaying`): attention returns the kept result (its values: the O projection reads them)
  through a Function whose backward runs the kept graph from the result's edge to the stand-ins'
  (`torch.autograd.grad` on `GradientEdge`s) and hands dq, dk, dv to the recomputed q, k and v. The
  attention forward does not run again; inside `kernels.lora.lean_recompute(qkv=True)` neither do the
  Q/K/V base GEMMs, whose values nothing reads now (attention's backward takes the kept q, k, v).
- with the O projection in the kept block (`run(..., params=(A_o, B_o))`, models.patch with `stash_o_proj`): the
  result is the O projection's output, so the recompute skips that GEMM too (+1.9% at 4x2048, session 10); the
  adapter enters through stand-ins that are copies of A and B (what the kept graph saves is those small tensors,
  not a flat buffer the parameters may view), and the replay hands their gradients back with dq, dk, dv.

The backward is the attention backend's own (cuDNN, flash varlen, or SDPA's CPU kernel): the stash calls no
private op. models.patch stashes only attention that runs as one kernel (`models.attention.one_kernel_path`):
on the dense-mask path the [B, 1, S, S] mask itself would be copied once per layer. Host memory: q, k, v, the
output and the result of every checkpointed layer (about 2.5x the layer input, 160 MiB per layer at 4x2048
tokens of an 8B model; 1.3 GiB at 65,536), on top of the offloaded layer inputs. On the CPU the "host
copy" is a plain clone, which saves nothing but runs the same code, so tests prove the gradients there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.autograd.graph import get_gradient_edge, saved_tensors_hooks

from raytune_llm.kernels.lora_thin import keep_thin_products

SideStream = Callable[[torch.device], torch.cuda.Stream]

# Stack of ("record" | "replay", list of stashes, cursor, new-stash factory or None); module-level, not thread-local,
# because a recompute runs on autograd's device thread (as kernels.lora's blocks).
_mode: list[tuple[str, list, list[int], Callable[[], AttentionStash] | None]] = []

# Device storages whose copies to host may still be reading them, with the event after their copies: those of the
# layer being recorded (`_copying`) and of the layers before it still in flight (`_in_flight`, oldest first). No
# `record_stream`: inside a CUDA graph capture the caching allocator cannot reuse a block freed with uses on another
# stream until the capture ends, so every layer's saved tensors stayed reserved (24 GiB at 4x2048 with 7.8 GiB
# allocated, session 8). Instead the forward of layer i + lag makes the compute stream wait for layer i's copies
# (`release_copied`; lag 2 by default: a whole layer's compute later, so they are mostly done) and frees the storages
# on that stream itself.
_copying: list[tuple[torch.cuda.Event, list[torch.Tensor]]] = []
_in_flight: list[list[tuple[torch.cuda.Event, list[torch.Tensor]]]] = []


def release_copied(everything: bool = False, lag: int = 2) -> None:
    """Free the device storages whose copies to host were started ``lag`` layers back, the compute stream first
    waiting for those copies; the last layer's join the ones in flight. A checkpointed layer's forward calls this
    before it runs (`settings.set_offload_lag`); ``everything`` (backward's start): every layer's at once."""
    global _copying
    _in_flight.append(_copying)
    _copying = []
    while len(_in_flight) > (0 if everything else max(lag - 1, 0)):
        for done, storages in _in_flight.pop(0):
            torch.cuda.current_stream(storages[0].device).wait_event(done)


class _PassThrough(torch.autograd.Function):
    """q, k or v as an output of a node that keeps nothing: the edge whose gradient is dq, dk or dv."""

    @staticmethod
    def forward(ctx, x, anchor):
        del anchor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, None


class _CopiedIn(torch.autograd.Function):
    """A trained parameter as a fresh copy of its own: what the kept graph saves of it is that small storage, not the
    buffer the parameter may be a view of (DeepSpeed's bf16 ZeRO-2 flattens every trainable parameter into one)."""

    @staticmethod
    def forward(ctx, x, anchor):
        del anchor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


# Pinned host memory comes from torch's caching host allocator, which rounds every block up to a power of two: a
# host-kept layer's gate output at 65,536 tokens of Llama-3.1-8B (1.75 GiB) took 2 GiB, 6 GiB over 12 layers' gate
# and up outputs, and the 125 GiB host of session 16 ran out one setting later. Copies above this size that are not a
# power of two go into power-of-two pieces instead (`pinned_pieces`).
_SPLIT_ABOVE = 1 << 20


def pinned_pieces(n: int) -> list[int]:
    """The lengths of the pinned blocks a host copy of ``n`` bytes goes into.

    Args:
        n: the copy's length in bytes.

    Returns:
        ``[n]`` for a power of two or at most `_SPLIT_ABOVE` bytes; else ``n``'s binary digits down to 1/32 of the
        largest, and what is left below them as one more piece (the allocator rounds that one up: at most 1/32 of
        ``n`` more, against up to ``n`` for one block). They add up to ``n``.
    """
    if n <= _SPLIT_ABOVE or n & (n - 1) == 0:
        return [n]
    top = n.bit_length() - 1
    pieces = [1 << b for b in range(top, top - 6, -1) if n >> b & 1]
    rest = n - sum(pieces)
    return pieces + [rest] if rest else pieces


def _spans(bufs: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, piece) of each of a host copy's pinned pieces, in order."""
    start = 0
    for buf in bufs:
        yield start, buf
        start += buf.numel()


class HostCopies:
    """Host copies of tensors' storages (once per storage), and their way back to the device.

    `pack` copies a tensor's storage to pinned host memory on the side stream (a plain clone on the CPU; with
    ``on_device``, no copy: the storage itself is kept) and returns a handle; `end_packing` lets go of the device storages packed so far; `prefetch` starts the copies
    back; `unpack(handle)` gives the tensor on its device, for the compute stream. Used for one attention
    call's saved tensors (below) and for a checkpointed layer's input (models.checkpointing).

    Separate from `AttentionStash` because the saved-tensor hooks of the kept graph hold `unpack`: were it a
    method of the object that also holds the graph's edges, graph and stash would form a cycle through C++
    objects that Python's collector cannot see, and a forward never followed by its backward (an exception in
    a later layer, a forward without backward) would keep its pinned copies for good.
    """

    def __init__(self, side_stream: SideStream | None, on_device: bool = False) -> None:
        self._side_stream = side_stream
        # Keep each storage itself, no copy: for the last checkpointed layer, whose backward comes first (its
        # storages would otherwise sit on the device until backward anyway, beside the copies brought back), and
        # the layers before it that `settings.set_last_layer_on_device` N keeps there too.
        self._on_device = on_device
        # (device, storage address) -> (host copy, its copy's event; or None: a CPU tensor, or kept on the device)
        # (the host copy: a list of pinned pieces on CUDA, see `pinned_pieces`)
        self._host: dict[tuple, tuple[torch.Tensor | list[torch.Tensor], torch.cuda.Event | None]] = {}
        self._dev: dict[tuple, torch.Tensor] = {}
        self._ready: torch.cuda.Event | None = None
        self._ready_device: torch.device | None = None
        # While recording: the storages packed so far, kept alive so that no later saved tensor of the same
        # call (a multi-op attention, e.g. SDPA's math path, frees its temporaries) reuses an address.
        self._alive: list[torch.Tensor] = []
        self._last_done: torch.cuda.Event | None = None

    # -- forward: storage-level copies to host --------------------------------------------------------

    def pack(self, t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in self._host:
            raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
            self._host[key] = (raw, None) if self._on_device else self._to_host(raw)
            self._alive.append(raw)
        return key, t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset()

    def _to_host(self, raw: torch.Tensor) -> tuple[torch.Tensor | list[torch.Tensor], torch.cuda.Event | None]:
        if not raw.is_cuda:
            return raw.clone(), None
        bufs = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in pinned_pieces(raw.numel())]
        stream = self._side_stream(raw.device)
        stream.wait_stream(torch.cuda.current_stream(raw.device))
        with torch.cuda.stream(stream):
            for start, buf in _spans(bufs):
                buf.copy_(raw[start : start + buf.numel()], non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._last_done = done  # end_packing hands the storages to release_copied, which waits for this
        return bufs, done

    # -- backward: back to the device ---------------------------------------------------------------------

    def prefetch(self) -> None:
        """Start copying every kept storage back to where it was (side stream on CUDA; no-op once started)."""
        if self._dev or not self._host:
            return
        cuda = {key: (buf, done) for key, (buf, done) in self._host.items() if done is not None}
        self._dev.update({key: buf for key, (buf, done) in self._host.items() if done is None})  # CPU: stay
        if cuda:
            self._ready_device = next(iter(cuda))[0]
            stream = self._side_stream(self._ready_device)
            # Allocated on the compute stream that reads them (no record_stream, see release_copied); the side
            # stream writes them only after what that stream had queued, which may have used their blocks.
            for key, (bufs, _) in cuda.items():
                self._dev[key] = torch.empty(sum(b.numel() for b in bufs), dtype=torch.uint8, device=key[0])
            stream.wait_stream(torch.cuda.current_stream(self._ready_device))
            with torch.cuda.stream(stream):
                for key, (bufs, done) in cuda.items():
                    stream.wait_event(done)
                    for start, buf in _spans(bufs):
                        self._dev[key][start : start + buf.numel()].copy_(buf, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record(stream)
        self._host.clear()  # the host allocator keeps each pinned block until its copy has read it

    def unpack(self, handle: tuple) -> torch.Tensor:
        key, dtype, device, shape, stride, offset = handle
        if not self._dev:
            self.prefetch()
        raw = self._dev[key]
        if self._ready is not None:
            torch.cuda.current_stream(self._ready_device).wait_event(self._ready)
            self._ready = None
        return torch.empty(0, dtype=dtype, device=device).set_(raw.untyped_storage(), offset, shape, stride)

    def end_packing(self) -> None:
        """From here handles are only unpacked: the device storages packed so far may be freed once their copies
        have read them (`release_copied`)."""
        if self._alive and self._last_done is not None:
            _copying.append((self._last_done, self._alive))
        self._alive, self._last_done = [], None

    def clear(self) -> None:
        self._host.clear()
        self._dev.clear()
        self.end_packing()


class AttentionStash:
    """What one attention call of a checkpointed layer kept: its saved storages' host copies, the result's
    handle among them, and the graph edges of the result and of the q, k, v stand-ins."""

    def __init__(self, side_stream: SideStream | None, on_device: bool = False) -> None:
        self.copies = HostCopies(side_stream, on_device)
        self.result: tuple | None = None
        self.edge_out = None
        self.edges_in: list = []

    def prefetch(self) -> None:
        """Start copying the kept storages back (see `HostCopies.prefetch`)."""
        self.copies.prefetch()

    def clear(self) -> None:
        self.copies.clear()
        self.result, self.edge_out, self.edges_in = None, None, []


class _Replay(torch.autograd.Function):
    """The recompute's attention: the kept result forward, the kept graph backward."""

    @staticmethod
    def forward(ctx, stash, q, k, v, *params):
        ctx.stash = stash
        return stash.copies.unpack(stash.result)

    @staticmethod
    def backward(ctx, grad):
        stash = ctx.stash
        grads = torch.autograd.grad([stash.edge_out], stash.edges_in, [grad], allow_unused=True)
        stash.clear()
        return None, *grads


def _record(stash: AttentionStash, attn: Callable, q, k, v, params: tuple) -> torch.Tensor:
    anchor = torch.empty(0, device=q.device, requires_grad=True)
    copies = stash.copies
    # keep_thin_products(None): the replay runs none of attn's adapter products again, so none is kept for it
    with torch.enable_grad(), saved_tensors_hooks(copies.pack, copies.unpack), keep_thin_products(None):
        stand_ins = [_PassThrough.apply(t.detach(), anchor) for t in (q, k, v)]
        stand_ins += [_CopiedIn.apply(p.detach(), anchor) for p in params]
        out = attn(*stand_ins)
    stash.edge_out = get_gradient_edge(out)
    stash.edges_in = [get_gradient_edge(t) for t in stand_ins]
    stash.result = copies.pack(out)
    copies.end_packing()
    return out.detach()


def run(
    attn: Callable[..., torch.Tensor], q, k, v, keep: bool = True, params: tuple[torch.Tensor, ...] = ()
) -> torch.Tensor:
    """`attn(q, k, v, *params)`, kept for replay inside `recording`, replayed inside `replaying`, else plain.

    Args:
        attn: the attention as a function of q, k, v and `params` (mask, scale and window closed over). Its only
            inputs that need gradients must be those: the replay hands out gradients for them alone.
        q, k, v: its inputs; only their gradients are needed when replaying, not their values.
        keep: False runs `attn` plainly even inside the blocks (neither kept nor replayed: the recompute
            computes it again), for calls not worth a host copy; the forward and the recompute must agree.
        params: trained tensors `attn` also reads (the O projection's adapter, when `attn` includes it: then the
            recompute skips the O projection too, and the replay's backward returns their gradients).

    Returns:
        The attention result (in a replay: the values the forward computed).
    """
    if not _mode or not keep:
        return attn(q, k, v, *params)
    mode, stashes, cursor, new_stash = _mode[-1]
    if mode == "record":
        stash = new_stash()
        stashes.append(stash)
        return _record(stash, attn, q, k, v, params)
    stash = stashes[cursor[0]]
    cursor[0] += 1
    return _Replay.apply(stash, q, k, v, *params)


@contextlib.contextmanager
def recording(stashes: list[AttentionStash], side_stream: SideStream | None, on_device: bool = False) -> Iterator[None]:
    """Keep every `run` call of this block (a checkpointed layer's forward) in `stashes`, in call order.

    Args:
        stashes: the layer's list, filled here.
        side_stream: the CUDA stream getter the copies to host run on (the one of the layer inputs); None
            for a block that only sees CPU tensors.
        on_device: keep the saved storages themselves where they are instead of host copies (`HostCopies`).
    """
    _mode.append(("record", stashes, [0], lambda: AttentionStash(side_stream, on_device)))
    try:
        yield
    finally:
        _mode.pop()


@contextlib.contextmanager
def replaying(stashes: list[AttentionStash]) -> Iterator[None]:
    """Replay `stashes` for the `run` calls of this block (the same layer's recompute), in call order.

    Raises:
        RuntimeError: the block made a different number of calls than the recorded forward.
    """
    cursor = [0]
    _mode.append(("replay", stashes, cursor, None))
    try:
        yield
    finally:
        _mode.pop()
    if cursor[0] != len(stashes):
        raise RuntimeError(
            f"attention stash: the recompute made {cursor[0]} attention calls, the forward {len(stashes)}"
        )
