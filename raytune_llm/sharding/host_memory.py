"""The pinned host memory a training process holds, and the check that a node has it.

Offloaded checkpointing keeps every checkpointed layer's input in pinned host memory from its forward to its
backward, and with `stash_attention` what the layer's attention saved as well (q, k, v, the attention output and
its log-sum-exp, and the O projection's output); `keep_mlp_layers_on_host` adds the gate and up outputs of that
many layers (`keep_mlp_gate_on_host` the gate output alone of that many more), `embeddings_on_host` /
`head_on_host` a table each, and `weights_on_host` the decoder layers' base
weights (with or without offload). All of it is page-locked: the kernel cannot swap it, and a node that runs short
kills the process (session 16: `+hostkeep16` at 65,536 tokens of Llama-3.1-8B on a 125 GiB host, 127.9 GiB by the
count below and 136 with the pinned allocator's rounding of that session, was killed with no error; `+hostkeep12`,
113.9 and 120, ran; session 17, in power-of-two pieces: `+hostkeep13` 117.4 by the count, 117.56 by torch's).
`check_host_memory` turns that into a one-line error before the first step. Plain Python: no torch.
"""

from __future__ import annotations

import os

from raytune_llm.sharding.shapes import GIB, Shape, mlp_chunk_rows

_ACT = 2  # bf16 activations
# What a node keeps for everything else: the process's own memory (CUDA context, libraries), Ray, the OS. Session 17
# on the device host (MemTotal 125.87 GiB), 1x65536, one process each, `free` sampled every 2 s: +hostkeep13 pinned
# 117.56 GiB (torch's count; 117.45 by ours) at 122.1 GiB used, the tables on the GPU +hostkeep14 119.06 (118.99) at
# 123.5, +stashattn+hostkeep18 119.49 (119.45) at 124.6: 4.4-5.1 GiB besides the pinned blocks, 1.3-3.8 GiB left.
# The larger of the two is 6.29 GiB there (119.57 usable: all three pass; +hostkeep14 with the tables on the host,
# 120.95, is refused); session 16's +hostkeep16, 127.9 by this count, was killed.
_RESERVE_GIB = 6.0
_RESERVE_FRACTION = 0.05
# What the process may still take besides its pinned blocks after the check (the steps' own buffers, Triton's
# compiles): for the check against what is free now. Not measured on its own (sampling `free` from the process's
# start, session 17 did not see what it held at the check).
_GROWTH_GIB = 2.0


class HostMemoryError(ValueError):
    """A run's pinned host memory does not fit its node (one line: what it needs, what there is, what to lower)."""


def _checkpointed(shape: Shape, checkpoint_layers: int | None) -> int:
    """How many decoder layers are checkpointed (None: all)."""
    return shape.layers if checkpoint_layers is None else min(checkpoint_layers, shape.layers)


def thin_kept_bytes(shape: Shape, tokens: int, a: dict) -> float:
    """GPU bytes of the adapters' ``X A^T`` the checkpointed layers keep from forward to recompute
    (`kernels.lora_thin`), at most: bf16 ``[tokens, r]`` for Q, K and V when all three are targeted (the fused
    projections run them together or not at all), for gate and up when the whole MLP is, and for O unless the
    attention stash keeps it. Only the fused kernels keep them (not under ZeRO-3, whose layers run stock; nor with
    LoRA dropout, a base bias or a padded or windowed attention, which this does not see)."""
    if a["checkpointing"] == "off" or not a["fused"]:
        return 0.0
    stashed_o = a["checkpointing"] == "offload" and a.get("stash_attention") and a.get("stash_o_proj", True)
    targets = set(a["lora_targets"])
    n = 3 * {"q_proj", "k_proj", "v_proj"}.issubset(targets) + 2 * {"gate_proj", "up_proj", "down_proj"}.issubset(
        targets
    )
    n += "o_proj" in targets and not stashed_o
    return _checkpointed(shape, a.get("checkpoint_layers")) * 2 * tokens * a["lora_rank"] * n


def device_layers(shape: Shape, checkpoint_layers: int | None, last_layer_on_device: bool | int) -> int:
    """How many of the last layers keep their inputs and stashes on the GPU, as `models.patch` picks them: none
    unless the last layer is checkpointed, never layer 0 (true is one)."""
    last_checkpointed = _checkpointed(shape, checkpoint_layers) == shape.layers
    return min(int(last_layer_on_device), shape.layers - 1) if last_checkpointed else 0


def host_kept_count(
    shape: Shape,
    checkpoint_layers: int | None,
    keep_mlp_layers: int,
    on_host: int,
    last_layer_on_device: bool | int = 0,
) -> int:
    """How many layers `keep_mlp_layers_on_host` really sends to the host, as `models.patch` picks them: below the
    GPU-kept layers of the checkpointed ones, never the last layer nor one that keeps its stash on the GPU."""
    return min(on_host, _below(shape, checkpoint_layers, keep_mlp_layers, last_layer_on_device))


def host_gate_count(
    shape: Shape,
    checkpoint_layers: int | None,
    keep_mlp_layers: int,
    on_host: int,
    gate_on_host: int,
    last_layer_on_device: bool | int = 0,
) -> int:
    """How many layers `keep_mlp_gate_on_host` really sends the gate output of to the host: of the layers
    `host_kept_count` could have taken, those it left (`models.checkpointing.host_gate_layers`)."""
    below = _below(shape, checkpoint_layers, keep_mlp_layers, last_layer_on_device)
    return max(min(gate_on_host, below - min(on_host, below)), 0)


def _below(shape: Shape, checkpoint_layers: int | None, keep_mlp_layers: int, last_layer_on_device: bool | int) -> int:
    """The layers that may keep their MLP outputs on the host, as `models.patch` counts them: the checkpointed ones
    below the GPU-kept ones, never the last layer nor one that keeps its stash on the GPU."""
    n_dev = max(device_layers(shape, checkpoint_layers, last_layer_on_device), 1)
    return max(min(_checkpointed(shape, checkpoint_layers) - keep_mlp_layers, shape.layers - n_dev), 0)


def pinned_host_bytes(
    shape: Shape,
    tokens: int,
    *,
    checkpoint_layers: int | None = None,
    stash_attention: bool = False,
    stash_o_proj: bool = True,
    last_layer_on_device: bool | int = False,
    keep_mlp_layers: int = 0,
    keep_mlp_layers_on_host: int = 0,
    tables_on_host: int = 0,
    layer_weight_bytes: int = 0,
    mlp_chunk_tokens: int | str | None = None,
    act_bytes: int = _ACT,
    keep_mlp_gate_on_host: int = 0,
) -> dict[str, int]:
    """The pinned host bytes of one training process under offloaded checkpointing, by what holds them (zero
    entries left out). The settings are the model's (`models.settings`, `model.*` in the run config).

    Args:
        shape: the model's dimensions.
        tokens: tokens per micro-batch (rows x sequence length).
        checkpoint_layers: how many layers are checkpointed (None: all); each sends its input to the host but the
            last with `last_layer_on_device`.
        stash_attention: each of those layers keeps its attention's saved tensors there too.
        stash_o_proj: with it, the O projection's output as well (`settings.set_stash_attention`'s ``o_proj``).
        last_layer_on_device: the last layer's input and stash stay on the GPU (an int: the last that many).
        keep_mlp_layers, keep_mlp_layers_on_host: the layers that keep their gate and up outputs, on the GPU and
            in host memory (`host_kept_count`).
        keep_mlp_gate_on_host: more layers send their gate output alone (`host_gate_count`).
        tables_on_host: the input embedding and/or the LM head in pinned host memory (0, 1 or 2 tables).
        layer_weight_bytes: the decoder layers' base weights in pinned host memory (`models.host_weights`).
        mlp_chunk_tokens: the model's setting; an MLP split over its tokens at this many keeps no outputs.
        act_bytes: bytes per activation element (2: bf16).
    """
    offloaded = max(
        _checkpointed(shape, checkpoint_layers) - device_layers(shape, checkpoint_layers, last_layer_on_device), 0
    )
    k = (checkpoint_layers, keep_mlp_layers, keep_mlp_layers_on_host)
    kept = 2 * host_kept_count(shape, *k, last_layer_on_device)  # outputs: gate and up a layer, or the gate alone
    kept += host_gate_count(shape, *k, keep_mlp_gate_on_host, last_layer_on_device)
    kept = 0 if mlp_chunk_rows(shape.intermediate, tokens, mlp_chunk_tokens, act_bytes) is not None else kept
    layer_input, stash = layer_offload_bytes(shape, tokens, stash_attention, stash_o_proj, act_bytes)
    out = {
        "layer inputs": offloaded * layer_input,
        "attention stash": offloaded * stash,
        "kept MLP outputs": kept * act_bytes * tokens * shape.intermediate,
        "host tables": tables_on_host * act_bytes * shape.vocab * shape.hidden,
        "layer weights": layer_weight_bytes,
    }
    return {k: v for k, v in out.items() if v}


def layer_offload_bytes(
    shape: Shape, tokens: int, stash_attention: bool, stash_o_proj: bool = True, act_bytes: int = _ACT
) -> tuple[int, int]:
    """(input, attention stash) bytes one offloaded layer copies to the host, or keeps on the GPU when it is one of
    `last_layer_on_device`'s: q, k, v, the attention output, the O projection's output (``stash_o_proj``) and the
    log-sum-exp in fp32; no stash without ``stash_attention``."""
    d, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    stash = act_bytes * tokens * (2 * q + 2 * kv + d * stash_o_proj) + 4 * tokens * shape.heads
    return act_bytes * tokens * d, stash if stash_attention else 0


def planned_pinned_bytes(
    shape: Shape, tokens: int, a: dict, ddp: bool, linear: float, tables: int
) -> tuple[dict[str, int], int, float, int]:
    """The planner's side (`sharding.planner`, its settings dict ``a``, ``linear`` the layers' packed weight bytes):
    (`pinned_host_bytes`, the GPU bytes of one host-kept layer's outputs brought back during the backward of the layer
    above it (0: none kept there), the weight bytes off the device, the GPU bytes of the layers `last_layer_on_device`
    N keeps there besides the last two: N - 2 inputs and stashes, held from their forward to their backward. The
    planner's offload baseline, two layers' inputs and no stash, stands for the last one; the one below it is
    prefetched during the last one's backward, the peak, either way. H200, 8B (session 18): 1x65536 N = 1 -> 2 +0.01
    GiB (N - 1 layers would be +2.27); 1x16384 N = 1 -> 3 / 4 +0.69 / +1.26 (one / two layers: 0.56 / 1.13).
    An `offload_lag` past 2 adds (counted as if at the peak) the layers whose copies may still be in flight when the
    forward ends besides lag 2's (layers n - lag .. n - 3 of n checkpointed, less the on-device ones): each one's
    input and stash, and its MLP outputs where it is host-kept. H200, 8B, 1x16384 (session 19): lag 2 -> 3 +0.34 GiB
    measured, one GPU-kept layer's input and stash (0.56) counted.

    With `weights_on_host` (fused, DDP) the LoRA-wrapped projections' base weights of every layer sit on the host,
    each layer's buffer rounded up to a power of two by torch's pinned allocator; off the device are those of the
    checkpointed layers less about three (the last layer's, the next one's on its way, layer 0's between steps): the
    others keep theirs for their backward.
    """
    offload = a["checkpointing"] == "offload"
    ckpt, keep = a.get("checkpoint_layers"), a.get("keep_mlp_layers", 0)
    on_host, n_dev = a.get("keep_mlp_layers_on_host", 0), a.get("last_layer_on_device", False)
    chunk = a.get("mlp_chunk_tokens") if a["fused"] else None  # a split MLP keeps no outputs
    keeps = offload and a["fused"] and mlp_chunk_rows(shape.intermediate, tokens, chunk) is None
    n_host = host_kept_count(shape, ckpt, keep, on_host, n_dev) if keeps else 0
    n_gate = host_gate_count(shape, ckpt, keep, on_host, a.get("keep_mlp_gate_on_host", 0), n_dev) if keeps else 0
    host_weights, off_device = 0, 0.0
    if a.get("weights_on_host") and a["fused"] and ddp:
        sizes = shape.projections()
        per_layer = linear / shape.layers * sum(i * o for t, (i, o) in sizes.items() if t in a["lora_targets"])
        per_layer /= sum(i * o for i, o in sizes.values())
        host_weights = shape.layers * (1 << (max(int(per_layer), 1) - 1).bit_length())  # the allocator's power of two
        n_ckpt = 0 if a["checkpointing"] == "off" else _checkpointed(shape, ckpt)
        off_device = per_layer * max(n_ckpt - 3, 0)
    pinned = pinned_host_bytes(
        shape,
        tokens,
        checkpoint_layers=ckpt if offload else 0,
        stash_attention=a.get("stash_attention", False) and a["fused"],
        stash_o_proj=a.get("stash_o_proj", True),
        last_layer_on_device=n_dev,
        keep_mlp_layers=keep,
        keep_mlp_layers_on_host=n_host,
        keep_mlp_gate_on_host=n_gate,
        tables_on_host=tables,
        layer_weight_bytes=host_weights,
    )
    out = _ACT * tokens * shape.intermediate  # one MLP output (gate or up)
    back = (2 if n_host else 1 if n_gate else 0) * out
    on_device = 0
    if offload and a["fused"]:
        held = sum(layer_offload_bytes(shape, tokens, a.get("stash_attention", False), a.get("stash_o_proj", True)))
        on_device = max(device_layers(shape, ckpt, n_dev) - 2, 0) * held
        # past a lag of 2, the layers whose copies may still be in flight when the forward ends besides lag 2's (the
        # last checkpointed layer's forward waits for those lag back: layers n - lag .. n - 3 of n checkpointed),
        # less the on-device ones, which copy nothing; each with its host-kept outputs (a gate-only layer counted
        # wherever one may be)
        n = _checkpointed(shape, ckpt)
        lag = min(a.get("offload_lag", 2), n)
        top = n - device_layers(shape, ckpt, n_dev)
        below = _below(shape, ckpt, keep, n_dev)
        host = host_kept_placement(below, n_host)
        for i in range(max(n - lag, 0), min(n - 2, top)):
            on_device += held + (2 * out if i in host else out if n_gate and i < below else 0)
    return pinned, back, off_device, on_device


def capped_settings(shape: Shape, a: dict) -> list[str]:
    """The layer-count settings in the planner's settings ``a`` (`Plan.inputs`) that this model and mode take fewer
    of than asked, as `models.patch` caps them: one line each, for `raytune-llm plan` to say (a count past what the
    model takes is not an error: each setting takes what it can)."""
    ckpt = a.get("checkpoint_layers")
    n = _checkpointed(shape, ckpt) if a.get("checkpointing", "off") != "off" else 0
    offload = a.get("checkpointing") == "offload" and a.get("fused")
    keep, on_host, gate, n_dev = (
        a.get(k, 0)
        for k in ("keep_mlp_layers", "keep_mlp_layers_on_host", "keep_mlp_gate_on_host", "last_layer_on_device")
    )
    needs = "needs gradient_checkpointing=offload and fused=true"
    took = {
        "keep_mlp_layers": (keep, min(keep, n) if a.get("fused") else 0, "of the checkpointed layers, fused=true"),
        "keep_mlp_layers_on_host": (
            on_host,
            host_kept_count(shape, ckpt, keep, on_host, n_dev) if offload else 0,
            "below the GPU-kept and on-device layers" if offload else needs,
        ),
        "keep_mlp_gate_on_host": (
            gate,
            host_gate_count(shape, ckpt, keep, on_host, gate, n_dev) if offload else 0,
            "of those left" if offload else needs,
        ),
        "last_layer_on_device": (
            int(n_dev),
            device_layers(shape, ckpt, n_dev) if offload else 0,
            needs if not offload else "never layer 0" if n == shape.layers else "the last layer is not checkpointed",
        ),
        "offload_lag": (
            a.get("offload_lag", 2),
            min(a.get("offload_lag", 2), n) if offload else 0,
            "of the checkpointed layers" if offload else needs,
        ),
    }
    if a.get("offload_lag", 2) == 2:  # the default: nothing was asked
        took.pop("offload_lag")
    return [f"model.{k}={asked}: {got} here ({why})" for k, (asked, got, why) in took.items() if got < asked]


def host_kept_placement(below: int, n: int) -> set[int]:
    """The layers `models.checkpointing.host_kept_layers` sends to the host (the same rule; sharding may not import
    models): ``n`` of ``range(below)`` spread evenly from ``below - 1`` down."""
    n = min(n, below)
    return {below - 1 - j * (below // n) for j in range(n)} if n > 0 else set()


def patched_pinned_bytes(report, shape: Shape, tokens: int, act_bytes: int = _ACT) -> dict[str, int]:
    """`pinned_host_bytes` under a patched model's settings (its `models.report.PatchReport`; None: {}). Without
    `lean_recompute` no layer keeps its MLP outputs (`models.checkpointing`), so none are counted."""
    if report is None:
        return {}
    offload = report.gradient_checkpointing == "offload"
    lean = report.lean_recompute
    return pinned_host_bytes(
        shape,
        tokens,
        checkpoint_layers=report.checkpoint_layers if offload else 0,
        stash_attention=report.stash_attention,
        stash_o_proj=report.stash_o_proj,
        last_layer_on_device=report.last_layer_on_device,
        keep_mlp_layers=report.keep_mlp_layers,
        keep_mlp_layers_on_host=report.keep_mlp_layers_on_host if lean else 0,
        keep_mlp_gate_on_host=report.keep_mlp_gate_on_host if lean else 0,
        tables_on_host=report.embeddings_on_host + report.head_on_host,
        layer_weight_bytes=report.host_weight_bytes,
        mlp_chunk_tokens=report.mlp_chunk_tokens,
        act_bytes=act_bytes,
    )


def node_memory_bytes() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def node_available_bytes() -> int | None:
    """What this machine can still give without swapping (Linux's MemAvailable) in bytes; None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# What to lower for each part of the count, for the refusal.
_LOWER = {
    "layer inputs": "gradient_checkpointing=on or shorter rows",
    "attention stash": "model.stash_attention",
    "kept MLP outputs": "model.keep_mlp_layers_on_host / model.keep_mlp_gate_on_host",
    "host tables": "model.embeddings_on_host / model.head_on_host",
    "layer weights": "model.weights_on_host",
}


def node_memory_needed(per_process: float, processes: int = 1) -> float:
    """The least node memory in bytes on which `check_host_memory` lets ``processes`` processes holding
    ``per_process`` pinned bytes each run: their sum plus the reserve."""
    want = processes * per_process
    return max(want + _RESERVE_GIB * GIB, want / (1 - _RESERVE_FRACTION))


# What a patched model pins when its setting is made, before the first step (`models.settings`): gone from what is
# free by the time a worker checks.
PINNED_AT_SETUP = ("host tables", "layer weights")


def check_host_memory(
    needed: dict[str, int],
    processes: int = 1,
    total: int | None = None,
    available: int | None = None,
    pinned_now: tuple[str, ...] = (),
) -> None:
    """Refuse ``processes`` processes holding ``needed`` each (`pinned_host_bytes`) when they would not leave the
    node's reserve (the larger of 6 GiB and 5% of its memory) free, or when this process's share is more than what
    is free now (``available``) less room to grow: pinned memory another job holds, or blocks torch's pinned cache
    kept from an earlier run in this process (session 17: a second 1x65536 variant in one process then ran at 26 s
    a step, and a third was killed).

    Args:
        needed: pinned bytes of one process, by what holds them.
        processes: training processes on this node (one per GPU).
        total: the node's memory in bytes (default: this machine's).
        available: what the node can still give now, in bytes (`node_available_bytes`); None: not checked.
        pinned_now: the parts of ``needed`` already pinned (`PINNED_AT_SETUP`): out of the check against
            ``available``, which no longer holds them.

    Raises:
        HostMemoryError: one line: what is needed, the largest part, what the node has, the setting to lower.
    """
    if not needed:
        return
    total = node_memory_bytes() if total is None else total
    usable = total - max(_RESERVE_GIB * GIB, _RESERVE_FRACTION * total)
    one = sum(needed.values())
    want = processes * one
    largest = max(needed, key=needed.get)
    per = f" ({processes} processes)" if processes > 1 else ""
    if want > usable:
        raise HostMemoryError(
            f"this run needs {want / GIB:.1f} GiB of pinned host memory{per}, {largest} "
            f"{processes * needed[largest] / GIB:.1f} GiB of it, and this node has {total / GIB:.1f} GiB "
            f"({usable / GIB:.1f} usable): lower {_LOWER[largest]}"
        )
    to_come = {k: v for k, v in needed.items() if k not in pinned_now}
    if available is not None and to_come and sum(to_come.values()) > available - _GROWTH_GIB * GIB:
        part = max(to_come, key=to_come.get)
        raise HostMemoryError(
            f"this process will pin {sum(to_come.values()) / GIB:.1f} GiB more host memory, {part} "
            f"{to_come[part] / GIB:.1f} GiB of it, and this node has {available / GIB:.1f} GiB free now "
            f"({_GROWTH_GIB:.0f} GiB kept for the process to grow): free the node's memory or lower {_LOWER[part]}"
        )


def check_patched_host_memory(report, hf_config: dict, tokens: int, processes: int = 1, act_bytes: int = _ACT) -> None:
    """`check_host_memory` for a patched model (its `models.report.PatchReport`; None: nothing pinned) of this
    config.json, at ``tokens`` a micro-batch and ``act_bytes`` an activation element (the compute dtype's size): what
    a GPU worker and the benchmarks run before their first step."""
    needed = patched_pinned_bytes(report, Shape.from_hf(hf_config), tokens, act_bytes)
    available = node_available_bytes() if needed else None
    check_host_memory(needed, processes, available=available, pinned_now=PINNED_AT_SETUP)
