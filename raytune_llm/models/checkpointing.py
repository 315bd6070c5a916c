"""Activation checkpointing per decoder layer, with optional offload of the kept input to host memory.

`checkpoint_layer(fn, hidden, offload)` runs `fn(hidden)` without keeping its activations; only the
layer's input is kept, and backward recomputes the layer. With `offload=True` that input goes to
pinned host memory: on CUDA the copy runs on a side stream (the compute stream does not wait for it)
and comes back in backward; on the CPU it is a plain copy, which is pointless for memory but runs the
same code, so tests prove the gradients there.

Coming back, the copy is overlapped too: the layers of one forward that share an `OffloadChain` are
walked in reverse by backward, and each layer's backward first starts the host-to-device copy of the
input of the layer before it (side stream), so that copy runs under this layer's recompute and
backward instead of stalling the compute stream (64 MiB per layer at 4x2048 tokens of 8B: ~1.3 ms at
PCIe rates, 32 times a step). Cost: one more layer input on the GPU at a time.

With `lean=True` the recompute runs inside `kernels.lora.lean_recompute`: the fused MLP skips its down
projection, whose output nothing in backward reads (see there). With `keep_mlp` as well, the forward keeps the
MLP's gate and up outputs on the device and the recompute runs no MLP GEMM (`kernels.lora.keep_mlp_outputs`):
the trade of memory for time `models.settings.set_keep_mlp_layers` makes for the last layers.

With `stash=True` (offload only) the layer's attention is kept in host memory by its forward and replayed
by the recompute instead of run again (`models.attention_stash`); the stash travels and is prefetched with
the layer input. With `lean_qkv` as well, the recompute also skips the Q/K/V base GEMMs.

Why a custom autograd.Function and not `torch.utils.checkpoint`: the non-reentrant checkpoint keeps the
input alive through its closure, where `saved_tensors_hooks` cannot move it, so offloading needs the
input to be a saved tensor we own. Reentrant-style recomputation then needs two things done by hand:
RNG state restored (LoRA dropout on stock layers must draw the same mask twice) and autocast restored.
When the layer input does not require grad (frozen embeddings feeding layer 0), a zero-size anchor that
requires grad makes the output part of the graph, so the layer's LoRA weights still get gradients
(what `enable_input_require_grads` does for HF's reentrant checkpoint).
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable

import torch

from raytune_llm.kernels._dispatch import side_stream
from raytune_llm.kernels.lora import dequantize_once as once
from raytune_llm.kernels.lora import keep_mlp_outputs, lean_recompute, reuse_mlp_outputs
from raytune_llm.kernels.lora_thin import keep_thin_products, reuse_thin_products
from raytune_llm.models.attention_stash import AttentionStash, HostCopies, recording, release_copied, replaying

MODES = ("off", "on", "offload")

# Per thread (a recompute runs on autograd's device thread, set and read there): how many checkpointed layers'
# recomputes are running. What a layer returns inside one is only a root for `torch.autograd.backward`; nothing
# reads its values.
_recompute_depth = threading.local()


class _SumWithoutValues(torch.autograd.Function):
    """``h + m`` as autograd sees it (both inputs get the gradient), with no values: a zero-stride view of one zero."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, m: torch.Tensor):
        return h.new_zeros(()).expand(h.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad


def residual_add(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """A decoder layer's last residual add, ``h + m``. Inside a checkpointed layer's recompute the sum's values
    are read by nothing (the recompute's output only roots the layer's backward), so there it returns a tensor
    with the add's gradient and no values: no [tokens, hidden] pass (0.084-0.091 ms a layer at 4x2048 on the H200,
    where the lean recompute's MLP output is a zero-stride tensor and the add ran as a strided kernel; session 13's
    profile). Operands of different shapes or dtypes (promotion) take the plain add."""
    recomputing = getattr(_recompute_depth, "n", 0) > 0
    if recomputing and torch.is_grad_enabled() and h.shape == m.shape and h.dtype == m.dtype:
        if h.requires_grad or m.requires_grad:
            return _SumWithoutValues.apply(h, m)
    return h + m


def host_kept_layers(below: int, n: int) -> set[int]:
    """The layers of ``range(below)`` whose kept MLP outputs go to host memory (`settings.set_keep_mlp_layers_on_host`):
    ``n`` of them spread evenly, from ``below - 1`` down, so that the forward's copies of one have the layers after it
    to catch up before the next."""
    n = min(n, below)
    if n <= 0:
        return set()
    stride = below // n
    return {below - 1 - j * stride for j in range(n)}


def host_gate_layers(below: int, n_host: int, n: int) -> set[int]:
    """The layers of ``range(below)`` that send their MLP's gate output alone to host memory
    (`settings.set_keep_mlp_gate_on_host`): ``n`` of those `host_kept_layers` left out, spread evenly from the top over
    the ones with no host-kept neighbour first (whose copies would join a host-kept layer's on the PCIe link), then
    over the rest."""
    host = host_kept_layers(below, n_host)
    rest = [i for i in range(below - 1, -1, -1) if i not in host]
    apart = [i for i in rest if i - 1 not in host and i + 1 not in host]
    picked = _spread(apart, n)
    return picked | _spread([i for i in rest if i not in apart], n - len(picked))


def _spread(layers: list[int], n: int) -> set[int]:
    """``n`` of ``layers`` (in order), evenly spaced from the first."""
    n = min(n, len(layers))
    return {layers[j * (len(layers) // n)] for j in range(n)} if n > 0 else set()


def check_mode(mode: str) -> None:
    """Validate a gradient_checkpointing mode.

    Raises:
        ValueError: not one of "off", "on", "offload".
    """
    if mode not in MODES:
        raise ValueError(f"gradient_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return side_stream(device, "offload")


class OffloadChain:
    """The offloaded inputs of one forward's checkpointed layers, in forward order.

    Made by the caller's layer loop once per forward and passed to every `checkpoint_layer` of it; each
    layer's backward takes its own input (already copied back when the layer after it prefetched it)
    and starts the copy of the previous layer's. Held only by those layers' autograd nodes.
    """

    def __init__(self) -> None:
        self._slots: list[_Slot] = []

    def _add(
        self, hidden: torch.Tensor, stashes: list[AttentionStash], on_device: bool = False, kept: list | None = None
    ) -> int:
        self._slots.append(_Slot(hidden, stashes, on_device, kept))
        return len(self._slots) - 1

    def prefetch_last(self) -> None:
        """Start copying the last layer's input and stashes back (the layer loop calls this after the last layer).

        Backward reaches that layer first, with nothing before it to hide the copy behind: without this its
        input and then its stashes were copied back while the compute stream waited (~9 ms at 4x2048 tokens of
        an 8B model, an estimate from the copy rate, not measured). Started here, the copies run behind the final
        norm, the LM head and the loss. A no-op when the last layer keeps its own on the device
        (`settings.set_last_layer_on_device`).
        """
        if self._slots:
            self._slots[-1].prefetch()


class _Slot:
    """One offloaded layer input (its attention stashes, and kept MLP outputs sent to the host): in pinned host
    memory, or on their way back."""

    def __init__(
        self, hidden: torch.Tensor, stashes: list[AttentionStash], on_device: bool = False, kept: list | None = None
    ) -> None:
        self.copies = HostCopies(_side_stream, on_device)
        self.handle: tuple | None = self.copies.pack(hidden.detach())
        self.kept_handles = [self.copies.pack(t) for t in kept or []]
        self.kept: list[torch.Tensor] = []  # the kept outputs back on the device, after `take`
        self.copies.end_packing()
        self.stashes = stashes

    def prefetch(self) -> None:
        """Start copying the input and the stashes back (side stream on CUDA; no-op once started)."""
        for stash in self.stashes:
            stash.prefetch()
        self.copies.prefetch()

    def take(self) -> torch.Tensor:
        """The input on its device, for the compute stream; the slot lets go of it."""
        if self.handle is None:
            raise RuntimeError("an offloaded checkpoint's backward ran twice (retain_graph): its input was used up")
        x = self.copies.unpack(self.handle)
        self.kept = [self.copies.unpack(h) for h in self.kept_handles]
        self.handle, self.kept_handles = None, []
        self.copies.clear()
        return x


@contextlib.contextmanager
def _recompute():
    _recompute_depth.n = getattr(_recompute_depth, "n", 0) + 1
    try:
        yield
    finally:
        _recompute_depth.n -= 1


class _CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, opt, hidden, anchor):
        # opt: checkpoint_layer's settings (one namespace: a new one is one argument here, and backward's
        # gradient tuple stays four long)
        del anchor
        ctx.fn, ctx.after_backward, ctx.weights = fn, opt.after_backward, opt.weights
        ctx.dequant_once, ctx.lean, ctx.lean_qkv = opt.dequant_once, opt.lean, opt.lean_qkv
        ctx.device = hidden.device
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.cpu_rng = torch.get_rng_state()
        # Inside a CUDA graph capture (models.graphs, which refuses dropout) the RNG state cannot be read or restored.
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda and not capturing else None
        # models.host_weights: layer 0's weights stay bound after its backward for the next forward's start, but not
        # in a CUDA graph, whose next replay copies them in again (a copy left from the capture is not the graph's)
        ctx.weights_stay = opt.weights is not None and opt.weights[1] is None and not capturing
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        ctx.stashes = []
        ctx.kept_mlp = [] if opt.keep_mlp and opt.lean else None
        keep = keep_mlp_outputs(ctx.kept_mlp) if ctx.kept_mlp is not None else contextlib.nullcontext()
        ctx.thin = {}  # the adapters' X A^T, for the recompute (kernels.lora_thin)
        if opt.offload and hidden.is_cuda:
            # waits for the copies of the layer `lag` back (mostly done by now at 2 or more)
            release_copied(lag=opt.offload_lag)
        record = (
            recording(ctx.stashes, _side_stream, opt.on_device)
            if opt.stash and opt.offload
            else contextlib.nullcontext()
        )
        with torch.no_grad(), record:
            with keep, keep_thin_products(ctx.thin):
                out = fn(hidden)
        ctx.chain, ctx.index, ctx.gate_only = None, None, False
        if opt.offload:
            ctx.chain = opt.chain if opt.chain is not None else OffloadChain()
            # Kept outputs sent to the host go with the input: G and U of each kept call (G alone with keep_gate_only,
            # U let go); H A_d^T ([N, r]) stays.
            to_host = opt.keep_on_host and not opt.on_device and bool(ctx.kept_mlp)
            ctx.gate_only = to_host and opt.keep_gate_only
            kept = [t for entry in ctx.kept_mlp for t in entry[: 1 if ctx.gate_only else 2]] if to_host else None
            ctx.index = ctx.chain._add(hidden, ctx.stashes, opt.on_device, kept)
            if to_host:
                ctx.kept_mlp[:] = [(None, None, entry[2]) for entry in ctx.kept_mlp]  # the device storages may go
        else:
            ctx.save_for_backward(hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.weights is not None:  # models.host_weights: this layer's bound, the one below on its way
            ctx.weights[0].bind()
            if ctx.weights[1] is not None:
                ctx.weights[1].fetch()
        if ctx.chain is not None:
            if ctx.device.type == "cuda":
                release_copied(everything=True)  # the last layers' copies to host (a no-op after the first layer)
            slot = ctx.chain._slots[ctx.index]
            hidden = slot.take()
            if slot.kept:  # kept MLP outputs back from the host: (G, U) pairs, in call order (G alone: U None)
                back = slot.kept
                if ctx.gate_only:
                    ctx.kept_mlp[:] = [(back[j], None, e[2]) for j, e in enumerate(ctx.kept_mlp)]
                else:
                    ctx.kept_mlp[:] = [(back[2 * j], back[2 * j + 1], e[2]) for j, e in enumerate(ctx.kept_mlp)]
                slot.kept = []
            if ctx.index > 0:
                ctx.chain._slots[ctx.index - 1].prefetch()
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with once() if ctx.dequant_once else contextlib.nullcontext():
                replay = replaying(ctx.stashes) if ctx.stashes else contextlib.nullcontext()
                lean = lean_recompute(qkv=ctx.lean_qkv and bool(ctx.stashes)) if ctx.lean else contextlib.nullcontext()
                reuse = reuse_mlp_outputs(ctx.kept_mlp) if ctx.kept_mlp else contextlib.nullcontext()
                with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                    with lean, replay, reuse, reuse_thin_products(ctx.thin), _recompute():
                        out = ctx.fn(hidden)
                ctx.kept_mlp = ctx.thin = None  # the recompute's graph holds what it took; nothing else may
                torch.autograd.backward(out, grad_out)
        if ctx.weights is not None and not ctx.weights_stay:
            ctx.weights[0].unbind()
        if ctx.after_backward is not None:
            ctx.after_backward()
        grad_hidden = hidden.grad if ctx.hidden_requires_grad else None
        return None, None, grad_hidden, None


def checkpoint_layer(
    fn: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    offload: bool,
    dequant_once: bool = False,
    lean: bool = False,
    chain: OffloadChain | None = None,
    stash: bool = False,
    lean_qkv: bool = False,
    after_backward: Callable[[], None] | None = None,
    keep_mlp: bool = False,
    on_device: bool = False,
    keep_on_host: bool = False,
    weights: tuple | None = None,
    keep_gate_only: bool = False,
    offload_lag: int = 2,
) -> torch.Tensor:
    """Run one decoder layer under activation checkpointing.

    Args:
        fn: the layer as a function of its hidden-state input (other inputs closed over; they must not
            need gradients, as with RoPE cos/sin and the attention metadata).
        hidden: `[B, S, H]` layer input.
        offload: keep the input in (pinned) host memory between forward and backward.
        dequant_once: run the recompute and the backward inside `kernels.lora.dequantize_once`, so each
            NF4 weight of the layer is dequantized once for both (one layer's weights held in bf16).
        lean: run the recompute inside `kernels.lora.lean_recompute`. Only for a layer whose output values
            matter to nothing but backward (the layer's MLP output feeds a residual add and nothing else).
        chain: with `offload`, the `OffloadChain` of this forward's checkpointed layers, so backward
            prefetches each layer's input while the layer after it runs (None: no prefetch).
        stash: with `offload`, keep the layer's attention (`models.attention_stash.run` calls) in host
            memory and replay it in the recompute. No effect without `offload`.
        lean_qkv: with `lean` and a stash, the recompute's `lora_qkv` skips its base GEMMs. Only for layers
            where nothing but the replayed attention reads q, k and v (no q/k norm).
        after_backward: called once the layer's backward is done (`models.settings.set_after_layer_backward`).
        keep_mlp: with `lean`, the forward keeps the fused MLP's finished gate and up outputs (on the device) and
            the recompute reuses them instead of running those GEMMs again (`kernels.lora.keep_mlp_outputs`).
        on_device: with `offload`, keep the input and the attention stash where they are, no host copies: for the
            last layer, whose backward runs first, so that they are not on the device twice (the forward's own,
            freed at backward's start, and the copies brought back for it) and cross PCIe for nothing; for the
            layers before it (`settings.set_last_layer_on_device` N), held on the device from forward to backward,
            off the PCIe link.
        keep_on_host: with `keep_mlp` and `offload` (not `on_device`), the kept gate and up outputs go to pinned
            host memory with the layer's input and come back with it, one layer ahead of this layer's backward.
        keep_gate_only: with `keep_on_host`, the gate output alone goes to the host (half the bytes) and the up
            output is let go: the recompute runs the up GEMM again (`settings.set_keep_mlp_gate_on_host`).
        offload_lag: with `offload`, this layer's forward first waits for the copies to host of the layer this many
            back and frees their device storages (`settings.set_offload_lag`).
        weights: `models.host_weights`: (this layer's `LayerWeights`, the layer below's or None): backward binds
            this layer's base weights, starts the next one's on their way, and lets this layer's go when done
            (layer 0's stay bound: the next forward starts with them).

    Returns:
        The layer output; backward recomputes the layer and accumulates gradients into its parameters.
    """
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    opt = types.SimpleNamespace(
        offload=offload,
        dequant_once=dequant_once,
        lean=lean,
        chain=chain,
        stash=stash,
        lean_qkv=lean_qkv,
        after_backward=after_backward,
        keep_mlp=keep_mlp,
        on_device=on_device,
        keep_on_host=keep_on_host,
        keep_gate_only=keep_gate_only,
        offload_lag=offload_lag,
        weights=weights,
    )
    return _CheckpointFunction.apply(fn, opt, hidden, anchor)
