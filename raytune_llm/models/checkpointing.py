"""Activation checkpointing per decoder layer, with optional offload of the kept input to host memory.

`checkpoint_layer(fn, hidden, offload)` runs `fn(hidden)` without keeping its activations; only the
layer's input is kept, and backward recomputes the layer. With `offload=True` that input goes to
pinned host memory: on CUDA the copy runs on a side stream (the compute stream does not wait for it)
and comes back in backward; on the CPU it is a plain copy, which is pointless for memory but runs the
same code, so tests prove the gradients there.

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
from collections.abc import Callable

import torch

from raytune_llm.kernels.lora import dequantize_once as once

MODES = ("off", "on", "offload")

_streams: dict[int, torch.cuda.Stream] = {}


def check_mode(mode: str) -> None:
    """Validate a gradient_checkpointing mode.

    Raises:
        ValueError: not one of "off", "on", "offload".
    """
    if mode not in MODES:
        raise ValueError(f"gradient_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device=index)
    return _streams[index]


def _to_host(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    if not x.is_cuda:
        return x.detach().to("cpu", copy=True), None
    buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    stream = _side_stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        buf.copy_(x.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    # The allocator must not hand x's memory out before the side-stream copy has read it.
    x.record_stream(stream)
    return buf, done


def _to_device(buf: torch.Tensor, done: torch.cuda.Event | None, device: torch.device) -> torch.Tensor:
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)
    return buf.to(device, non_blocking=True)


class _CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, offload, dequant_once, hidden, anchor):
        del anchor
        ctx.fn = fn
        ctx.dequant_once = dequant_once
        ctx.device = hidden.device
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        with torch.no_grad():
            out = fn(hidden)
        if offload:
            ctx.host, ctx.done = _to_host(hidden)
        else:
            ctx.host, ctx.done = None, None
            ctx.save_for_backward(hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.host is not None:
            hidden = _to_device(ctx.host, ctx.done, ctx.device)
            ctx.host = None
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
                with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                    out = ctx.fn(hidden)
                torch.autograd.backward(out, grad_out)
        grad_hidden = hidden.grad if ctx.hidden_requires_grad else None
        return None, None, None, grad_hidden, None


def checkpoint_layer(
    fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, offload: bool, dequant_once: bool = False
) -> torch.Tensor:
    """Run one decoder layer under activation checkpointing.

    Args:
        fn: the layer as a function of its hidden-state input (other inputs closed over; they must not
            need gradients, as with RoPE cos/sin and the attention metadata).
        hidden: `[B, S, H]` layer input.
        offload: keep the input in (pinned) host memory between forward and backward.
        dequant_once: run the recompute and the backward inside `kernels.lora.dequantize_once`, so each
            NF4 weight of the layer is dequantized once for both (one layer's weights held in bf16).

    Returns:
        The layer output; backward recomputes the layer and accumulates gradients into its parameters.
    """
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return _CheckpointFunction.apply(fn, offload, dequant_once, hidden, anchor)
