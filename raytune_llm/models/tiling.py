"""Run a token-wise function (the decoder MLP) over chunks of tokens, keeping none of its intermediates.

The technique of Arctic Long Sequence Training's TiledMLP. At Llama-3.1-8B shapes one `[T, I]` bf16
intermediate (I = 14336) is 28 KiB per token, about 11 GiB at 400k tokens, and the fused LoRA MLP's
forward and backward hold several at once (G and U saved, H or dH live, dY W_d): they are most of one
layer's backward, which sets the peak once the checkpoints are offloaded.
`tiled_over_tokens(fn, x, chunk_tokens, params)`:

- forward: flattens `x [..., H]` to `[T, H]`, runs `fn` on `chunk_tokens` rows at a time without
  recording a graph, writes each chunk's output into one preallocated `[T, H_out]` and saves only `x`;
- backward: for each chunk in the same order, recomputes `fn` on a detached copy of the chunk that
  requires grad, calls `torch.autograd.backward(y_chunk, dy_chunk)` (the parameters' `.grad` accumulate
  chunk by chunk) and copies the chunk's dx into one preallocated dx.

So the MLP's `[·, I]` tensors exist for one chunk at a time, at the price of one more forward of `fn`
per step. The result equals the untiled `fn` up to the order in which the per-token contributions to
the parameter gradients are summed (the function must act on each token independently, as an MLP does).
RNG and autocast state are restored for the recompute, as in models.checkpointing, so a stock MLP with
LoRA dropout recomputes the masks it drew in forward (the masks differ from an untiled run's, since they
are drawn per chunk).

The parameters are not inputs of the autograd.Function: their gradients come from the nested backward
calls and land in `.grad` only, so `torch.autograd.grad(loss, params)` does not see them. A zero-size
anchor that requires grad (as in models.checkpointing) keeps the output in the graph when `x` does not
require grad. (With the parameters as inputs of the Function instead, ZeRO-2 reduced a parameter twice
even with the marks below.) What this means for the trainers:

- train/worker.py's data parallelism all-reduces `.grad` after backward: unaffected.
- DeepSpeed ZeRO-2/3 reduce a gradient from a hook each time it is accumulated and refuse a second one
  in a backward; following DeepSpeed's protocol for tiled compute (`ds_grad_is_ready`, which its own
  TiledMLP uses) the parameters are marked not ready for every chunk but the last. Without the marks
  both stages fail (ZeRO-2: "has already been reduced"; ZeRO-3: an assertion); with them a one-process
  gloo run gives the untiled gradients under ZeRO-2 and under ZeRO-3 (partitioned weights: the MLP runs
  its stock projections, whose pre-forward hooks gather them, once per chunk in forward and again in
  backward); see tests/models/test_tiling.py. Several ranks under ZeRO-3 are not tested; they must agree
  on the number of chunks (every chunk gathers), which fixed-length packed rows give.
- torch DistributedDataParallel is not supported: its reducer raises "Expected to mark a variable ready
  only once" (one gradient per parameter per backward). The trainer does not use it.

Automatic chunking (`chunk_tokens_for(setting="auto", ...)`): the chunk is the tallest whose `[c, I]`
intermediate in the compute dtype fits in `AUTO_BYTES` (1 GiB), rounded down to whole 64-row GEMM tiles,
and a call is tiled only when it has more tokens than that. At 8B shapes in bf16 (I = 14336) that is
37,440 tokens, at 70B shapes (I = 28672) 18,688. Below it the MLP's few `[T, I]` buffers total a few GiB,
small next to the weights and the checkpointed layer inputs, and tiling would only add its recompute
(one more MLP forward per layer, the largest share of a short sequence's FLOPs); the lengths measured in
bench/results stay untiled. Above it the untiled buffers grow linearly to tens of GiB while attention's
share of the FLOPs grows as `T^2`, so the recompute costs relatively less. A chunk as tall as the
threshold keeps the MLP's share of memory at `min(T, c)` rows: it never drops as the sequence grows,
so the memory planner (sharding/planner.py, which mirrors this rule) stays monotonic in the sequence
length and its search for the longest fitting one stays valid; chunks this tall keep the GEMMs large.
These are arithmetic, not measurements: no GPU run with tiling has been made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

AUTO_BYTES = 1 << 30
""""auto": the largest [chunk, I] intermediate (compute dtype) a chunk may make, and the size past which a
call's [T, I] is tiled at all (1 GiB)."""
_AUTO_ALIGN = 64  # chunk heights of "auto" are whole 64-row GEMM tiles


def check_chunk_tokens(value: int | str | None) -> None:
    """Validate an `mlp_chunk_tokens` setting.

    Raises:
        ValueError: not a positive int, 0, None or "auto".
    """
    ok = value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    if not ok:
        raise ValueError(f"mlp_chunk_tokens must be a positive int, 0 or None (off) or 'auto', got {value!r}")


def chunk_tokens_for(setting: int | str | None, tokens: int, intermediate_size: int, element_size: int) -> int | None:
    """The chunk height to tile an MLP call with, or None to run it untiled.

    Args:
        setting: a positive int (always tile, with that many tokens per chunk; a chunk larger than the
            call's tokens gives one chunk, which still drops the MLP's saved intermediates between forward
            and backward), 0 or None (never tile), or "auto" (see the module docstring).
        tokens: tokens of the call (micro-batch x sequence).
        intermediate_size: the MLP's intermediate width I.
        element_size: bytes per element of the compute dtype.

    Returns:
        Tokens per chunk, or None.
    """
    if not setting or tokens <= 0:
        return None
    if setting != "auto":
        return int(setting)
    chunk = max(_AUTO_ALIGN, AUTO_BYTES // (intermediate_size * element_size) // _AUTO_ALIGN * _AUTO_ALIGN)
    return chunk if tokens > chunk else None


def _mark_grad_ready(params: Sequence[torch.Tensor], ready: bool) -> None:
    """DeepSpeed ZeRO's tiled-compute flag: reduce a parameter's gradient only after its last chunk."""
    for p in params:
        if ready:
            p.__dict__.pop("ds_grad_is_ready", None)  # absent = ready, DeepSpeed's default
        else:
            p.ds_grad_is_ready = False


class _TiledFunction(torch.autograd.Function):
    """`apply(fn, chunk, params, x, anchor)`: see `tiled_over_tokens`; `params` ride in ctx, not as inputs."""

    @staticmethod
    def forward(ctx, fn, chunk, params, x, anchor):
        del anchor
        ctx.fn, ctx.chunk, ctx.params = fn, chunk, params
        ctx.device = x.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        rows = x.reshape(-1, x.shape[-1])
        out = None
        for start in range(0, rows.shape[0], chunk):
            y = fn(rows[start : start + chunk])
            if out is None:
                out = y.new_empty((rows.shape[0], y.shape[-1]))
            out[start : start + chunk] = y
            del y
        ctx.save_for_backward(x)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        rows = x.detach().reshape(-1, x.shape[-1])
        drows = dy.reshape(-1, dy.shape[-1])
        need_dx = ctx.needs_input_grad[3]
        dx = torch.empty_like(rows) if need_dx else None
        trainable = [p for p in ctx.params if p.requires_grad]
        starts = range(0, rows.shape[0], ctx.chunk)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        enabled, dtype = ctx.autocast
        try:
            with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
                for i, start in enumerate(starts):
                    _mark_grad_ready(trainable, ready=i == len(starts) - 1)
                    end = start + ctx.chunk
                    xc = rows[start:end].detach().requires_grad_(need_dx)
                    with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                        yc = ctx.fn(xc)
                    if yc.requires_grad:
                        torch.autograd.backward(yc, drows[start:end])
                    if need_dx:
                        if xc.grad is None:
                            dx[start:end].zero_()
                        else:
                            dx[start:end].copy_(xc.grad)
                    del xc, yc
        finally:
            _mark_grad_ready(trainable, ready=True)
        return None, None, None, dx.view(x.shape) if need_dx else None, None


def tiled_over_tokens(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    chunk_tokens: int,
    params: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """`fn(x)` computed `chunk_tokens` tokens at a time, keeping only `x` for backward.

    Args:
        fn: a function of `[n, H]` rows that treats each row independently (an MLP); it may read
            parameters (their gradients accumulate into `.grad` in backward).
        x: `[..., H]` input; the leading dimensions are flattened into tokens.
        chunk_tokens: tokens per chunk (> 0); the last chunk may be shorter.
        params: the parameters `fn` reads (pass every parameter of the module `fn` runs). When one
            requires grad the output is part of the graph even if `x` is not (layer 0 fed by frozen
            embeddings); the trainable ones get DeepSpeed's `ds_grad_is_ready` marks in backward.

    Returns:
        `fn(x)` with the leading dimensions of `x`.

    Raises:
        ValueError: `chunk_tokens` is not positive.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    if x.shape[:-1].numel() == 0:
        return fn(x)
    anchor = torch.empty(0, device=x.device, requires_grad=any(p.requires_grad for p in params))
    return _TiledFunction.apply(fn, chunk_tokens, tuple(params), x, anchor)
