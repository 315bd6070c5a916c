"""Per-GPU peak memory of a LoRA / QLoRA run, and the data-parallel strategy that fits.

Pure arithmetic on an HF config dict (config.json): no torch, no GPU, so `raytune-llm plan FILE` runs anywhere.
The prediction is the peak of `torch.cuda.max_memory_allocated` over training steps (the CUDA context and the
allocator's cache come on top: `usable_gib` keeps a reserve for them).

peak = weights + LoRA state (params, grads, AdamW) + workspace + activations, where activations are the
larger of two phases of a step:

- loss phase: checkpointed layer inputs + the logits path. The standard stack (transformers + PEFT) holds
  bf16 logits, their fp32 upcast, fp32 softmax and the fp32 logits gradient: 14 bytes per token per vocab
  entry (`_STD_LOGIT_BYTES`). The fused path (chunked linear + cross-entropy) never holds whole logits.
- layer phase: checkpointed inputs + one decoder layer recomputed and back-propagated. Its MLP tensors
  (`[tokens, intermediate]`: gate, up, their product and gradients) cover every token at once, or one chunk
  of tokens when the fused path splits the MLP over the sequence (`mlp_chunk_tokens`, models/tiling.py);
  with checkpointing off a tiled MLP also keeps none of them between forward and backward, so there "auto"
  makes the peak drop where the split starts; otherwise the peak never falls as the tokens grow.

Calibration (ANCHORS.md, Llama-3.1-8B shapes, r=16 on all 7 projections, checkpointing on, H200): the
standard stack is linear in tokens at 2.08 MB/token with a 6.27 GB intercept (21.7 / 9.8 / 37.5 GiB at 4x2048 /
1x2048 / 1x16384), which the loss phase reproduces within 1.5%. The fused path counts its own tensors (see
`_kept_layer_bytes` and `_layer_bytes`) and is checked against raytune_llm's peaks measured on the H200
(tests/sharding/test_planner_vs_h200.py: the e2e shapes, the recomputation variants and the 70B runs).

Strategies, cheapest first: DDP (also a single GPU), ZeRO-2 (optimizer states and gradients partitioned),
ZeRO-3 (parameters too: the base model is divided by the GPU count), ZeRO-3 + CPU offload (parameters and
optimizer states in host memory; others measured it raising GPU memory with QLoRA, so it is the last resort).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The model's dimensions live in sharding/shapes.py; imported here, the planner's callers find them here too.
from raytune_llm.sharding.host_memory import planned_pinned_bytes, thin_kept_bytes
from raytune_llm.sharding.shapes import (
    GIB,
    LLAMA31_8B,
    LLAMA31_70B,
    PlanError,
    Shape,
    load_hf_config,
    lora_param_count,
    mlp_chunk_rows,
)

__all__ = [
    "GIB",
    "LLAMA31_8B",
    "LLAMA31_70B",
    "AUTO_MARGIN",
    "Plan",
    "PlanError",
    "Shape",
    "fewest_checkpointed_layers",
    "load_hf_config",
    "lora_param_count",
    "max_seq_len",
    "mlp_chunk_rows",
    "plan_from_values",
]

CHECKPOINTING = ("off", "on", "offload")
STRATEGIES = ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3+offload")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Bytes per weight of a quantized Linear. NF4 with double quant (the project default): 4 bits + one 8-bit
# absmax per 64-element block + one fp32 scale per 256 blocks = 0.5 + 1/64 + 4/16384 bytes.
# int8 (LLM.int8): 1 byte + one fp32 row scale (counted per weight as ~0). bf16: 2 bytes.
_WEIGHT_BYTES = {4: 0.5 + 1 / 64 + 4 / (64 * 256), 8: 1.0, 16: 2.0}
# The standard stack's logits path, bytes per token per vocab entry at the loss: bf16 logits (2) + fp32
# upcast (4) + fp32 log-softmax (4) + fp32 gradient (4). Fits the anchors' 2.08 MB/token slope within 1%.
_STD_LOGIT_BYTES = 14
# Head rows per chunk of the streamed loss (kernels.cross_entropy_streamed.VOCAB_CHUNK).
_HEAD_CHUNK_ROWS = 4096
# Fused linear+CE works on row chunks: at most this many rows of fp32 logits and their gradient at once
# (256 x 128256 x 8 B = 263 MB for Llama 3; below one layer's backward from ~1k tokens on).
_CE_CHUNK_ROWS = 256
# The standard stack's recomputed layer holds the tensors counted in `_layer_bytes` plus PEFT's fp32 adapter
# copies and allocator slack: fitted to ANCHORS.md's figures.
# Hidden-sized buffers beyond the counted tensors in the fused layer phase (the recomputed input, a split
# MLP's full-size output and input gradient, attention's fp32 dQ accumulator). With 2 the planner is within
# -5.3%..+8.7% of 15 H200 peaks, from 8B 1x2048 to 8B 1x65536, 70B x 4096 with 44 of 80 layers checkpointed,
# and the longest runs (8B x 523,264: -5.3%, 70B x 159,744: +0.3%); tests/sharding/test_planner_vs_h200.py
# keeps the e2e, variant and 70B cases.
_FUSED_EXTRA_D = 2
_STD_LAYER_FACTOR = 1.6
# cuBLAS workspace on Hopper (32 MiB); the caching allocator's rounding is inside max_memory_allocated's
# slack that the anchors' intercept (6.27 GB standard, 6.42 GB Unsloth at 8B) leaves no room for beyond this.
_FIXED_WORKSPACE = 32 * 1024**2
# Fraction of the GPU's memory a plan may use: the CUDA context (~0.5 GiB), NCCL buffers and fragmentation of
# the caching allocator are outside max_memory_allocated.
_USABLE_FRACTION = 0.92
_RESERVE_GIB = 1.0
# ZeRO-3 keeps the current layer gathered and prefetches the next: two layers' weights live at once.
_ZERO3_LIVE_LAYERS = 2


@dataclass
class Plan:
    """A memory plan: the per-GPU breakdown of the chosen strategy, or why nothing fits.

    Attributes:
        strategy: one of STRATEGIES, or None when nothing fits.
        fits: whether `strategy` fits the usable memory.
        reason: why this strategy (or why nothing fits, with what to try).
        breakdown: component -> bytes per GPU for the chosen strategy (the cheapest-memory one when none fits).
        usable_bytes: the memory budget per GPU the plan was held against.
        world_size: GPUs in total.
        inputs: the arguments the plan was computed from, for the table.
        alternatives: strategy -> predicted peak bytes for every strategy considered.
    """

    strategy: str | None
    fits: bool
    reason: str
    breakdown: dict[str, float]
    usable_bytes: float
    world_size: int
    inputs: dict = field(default_factory=dict)
    alternatives: dict[str, float] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> float:
        """Predicted peak allocated bytes per GPU."""
        return sum(v for k, v in self.breakdown.items() if not k.startswith("host"))

    @property
    def peak_gib(self) -> float:
        """Predicted peak allocated GiB per GPU."""
        return self.peak_bytes / GIB

    def table(self) -> str:
        """A text table of the inputs, the per-GPU breakdown, every strategy's peak and the verdict."""
        lines = ["inputs: " + ", ".join(f"{k}={v}" for k, v in self.inputs.items())]
        lines.append(f"{'per GPU':<34}{'GiB':>10}")
        for name, value in self.breakdown.items():
            lines.append(f"  {name:<32}{value / GIB:>10.2f}")
        lines.append(f"  {'peak (predicted)':<32}{self.peak_gib:>10.2f}")
        lines.append(f"  {'usable of the GPU':<32}{self.usable_bytes / GIB:>10.2f}")
        lines.append("strategies: " + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in self.alternatives.items()))
        gpus = f"{self.world_size} GPU{'s' if self.world_size > 1 else ''}"
        lines.append(f"strategy: {self.strategy} ({gpus}): {self.reason}" if self.fits else f"{gpus}: {self.reason}")
        return "\n".join(lines)


def _weight_bytes(shape: Shape, quant_bits: int) -> tuple[float, float]:
    """(decoder Linear weights, embeddings + LM head + norms) in bytes; bitsandbytes leaves the latter in bf16."""
    per_layer = sum(i * o for i, o in shape.projections().values())
    linear = shape.layers * per_layer * _WEIGHT_BYTES[quant_bits]
    dense = 2 * shape.vocab * shape.hidden * (1 if shape.tied else 2) + 2 * shape.hidden * (2 * shape.layers + 1)
    return linear, dense


def _layer_bytes(shape: Shape, fused: bool, tokens: int, mlp_rows: int) -> float:
    """Bytes of one decoder layer recomputed and back-propagated (bf16 activations) over `tokens` tokens, its
    MLP's `[·, intermediate]` tensors covering `mlp_rows` tokens at once (all of them, or one chunk)."""
    d, f, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    # Saved for backward: both norms' input and output, q, attention output, o input (= attention output
    # reshaped, shared), k and v; in the MLP gate, up and silu(gate)*up.
    if fused:
        # The layer's saved tensors (see `_kept_layer_bytes`: no H) plus, at the backward's peak, the incoming
        # gradient, the outgoing one being summed, and one [., I] gradient (dH, later written over G and U in
        # place), + `_FUSED_EXTRA_D` hidden-sized buffers (the recomputed input and a split MLP's full-size
        # output and input gradient). Fitted to the H200's peaks, see `_FUSED_EXTRA_D`.
        per_token = (6 * d + _FUSED_EXTRA_D * d + 2 * q + 2 * kv) * tokens + 3 * f * mlp_rows
        return 2 * per_token
    saved, saved_mlp = 4 * d + 2 * q + 2 * kv, 3 * f
    # Live while back-propagating: the incoming gradient; in the MLP the gate/up gradients.
    transient, transient_mlp = 2 * d, 2 * f
    per_token = (saved + transient) * tokens + (saved_mlp + transient_mlp) * mlp_rows
    return 2 * per_token * _STD_LAYER_FACTOR


def _kept_layer_bytes(shape: Shape, fused: bool, tokens: int, mlp_tiled: bool) -> float:
    """Bytes one decoder layer that is not checkpointed holds from its forward to its backward (bf16).

    Fused path: both norms' inputs, the QKV input, q, k, v and the attention output (the O projection's input
    is the same tensor), the MLP's input, gate and up (H is recomputed from them); a tiled MLP keeps only its
    input. Measured on the H200 (bench/results/bigmodel_h200_20261128.json, e2e_variants_h200_20261128.json):
    0.834 GiB per kept layer at 70B x 4096 tokens (this count: 0.828) and 0.849 at 8B x 8192 (0.844). The
    standard stack keeps what its layer phase saves (`_layer_bytes`, not measured per layer).
    """
    if not fused:
        return _layer_bytes(shape, fused, tokens, tokens)
    d, f, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    return 2 * tokens * (4 * d + 2 * q + 2 * kv + (0 if mlp_tiled else 2 * f))


def _activation_bytes(
    shape: Shape,
    tokens: int,
    checkpointing: str,
    fused: bool,
    mlp_chunk_tokens: int | str | None = None,
    checkpoint_layers: int | None = None,
    *,
    fused_loss: bool,
    keep_mlp_layers: int = 0,
    streamed_head: bool = False,
) -> tuple[float, float]:
    """(checkpointed or stored activations, loss/logits path) at the step's peak, in bytes.

    `fused_loss`: the loss runs the chunked linear + CE. Not under ZeRO-3 even when `fused`: the fused CE reads the
    LM head's weight, which ZeRO-3 partitions (models/patch.py leaves that head stock).
    `streamed_head`: the fused loss streams a host head (`kernels.cross_entropy_streamed`): two 4096-row head
    chunks, one [tokens, 4096] logits chunk and an fp32 [tokens, hidden] accumulator beside the gradient.
    `keep_mlp_layers`: the last checkpointed layers that keep their MLP's gate and up outputs
    (`models.settings.set_keep_mlp_layers`); every one but the first reached by backward is held at the peak (all
    of them when some layers are not checkpointed).
    """
    chunk = mlp_chunk_rows(shape.intermediate, tokens, mlp_chunk_tokens) if fused else None
    d, layer = shape.hidden, _layer_bytes(shape, fused, tokens, tokens if chunk is None else min(chunk, tokens))
    # A layer that keeps its activations holds its saved tensors (`_kept_layer_bytes`); the one being
    # back-propagated is the layer phase itself.
    kept_layer = _kept_layer_bytes(shape, fused, tokens, mlp_tiled=chunk is not None)
    n_ckpt = (
        shape.layers if checkpointing == "off" or checkpoint_layers is None else min(checkpoint_layers, shape.layers)
    )
    if checkpointing == "off":
        n_ckpt = 0
    kept = max(shape.layers - n_ckpt - 1, 0) * kept_layer
    if fused and chunk is None and n_ckpt:
        # The first kept layer backward reaches is free when it is the last layer (its outputs go when the recompute
        # would have made them); behind layers that are not checkpointed, every kept layer is held at their peak.
        free = 1 if n_ckpt >= shape.layers else 0
        kept += max(min(keep_mlp_layers, n_ckpt) - free, 0) * 2 * 2 * tokens * shape.intermediate
    if checkpointing == "on":
        stored = n_ckpt * 2 * d * tokens + kept
    elif checkpointing == "offload":
        # one layer input leaving for the host, one coming back
        stored = (2 * 2 * d * tokens if n_ckpt else 0) + kept
    else:
        stored = kept
    if fused_loss and streamed_head:
        loss = 2 * d * tokens + 4 * d * tokens + 2 * _HEAD_CHUNK_ROWS * (tokens + 2 * d)
    elif fused_loss:
        # hidden-state gradient kept from the fused forward + one chunk of fp32 logits and their gradient
        loss = 2 * d * tokens + 8 * min(tokens, _CE_CHUNK_ROWS) * shape.vocab
    else:
        loss = _STD_LOGIT_BYTES * shape.vocab * tokens
    # The peak is whichever phase is larger: the loss (stored + logits) or one layer's backward (stored + layer).
    return stored, max(loss, layer)


def _lora_state_bytes(n: int, strategy: str, world: int) -> tuple[float, float]:
    """(GPU bytes, host bytes) of LoRA params + grads + AdamW states under a strategy.

    DDP: fp32 params, grads and two AdamW moments (16 B) + DDP's gradient buckets (4 B) when world > 1.
    ZeRO (bf16 engine): bf16 params and grads (4 B) + fp32 master, moments and grad partition (16 B / world);
    ZeRO-3 also partitions the bf16 params and grads; offload moves the 16 B / world to the host.
    """
    if strategy == "DDP":
        return n * (16 + (4 if world > 1 else 0)), 0.0
    shard = 16 * n / world
    if strategy == "ZeRO-2":
        return 4 * n + shard, 0.0
    if strategy == "ZeRO-3":
        return 4 * n / world + shard, 0.0
    return 4 * n / world, shard


def _on_host(setting: str, shape: Shape, strategy: str, a: dict) -> bool:
    """Whether a host-weight setting (`embeddings_on_host`, `head_on_host`) moves its table: fused, untied, DDP."""
    return bool(a.get(setting)) and a["fused"] and not shape.tied and strategy == "DDP"


def _breakdown(shape: Shape, strategy: str, world: int, a: dict) -> dict[str, float]:
    linear, dense = _weight_bytes(shape, a["quant_bits"])
    n_lora = lora_param_count(shape, a["lora_rank"], a["lora_targets"])
    lora_gpu, lora_host = _lora_state_bytes(n_lora, strategy, world)
    tokens = a["seq_len"] * a["micro_batch"]
    zero3 = strategy in ("ZeRO-3", "ZeRO-3+offload")
    on_host = [setting for setting in ("embeddings_on_host", "head_on_host") if _on_host(setting, shape, strategy, a)]
    stored, phase = _activation_bytes(
        shape,
        tokens,
        a["checkpointing"],
        a["fused"],
        a["mlp_chunk_tokens"],
        a.get("checkpoint_layers"),
        fused_loss=a["fused"] and not zero3,
        keep_mlp_layers=a.get("keep_mlp_layers", 0) if a["checkpointing"] != "off" else 0,
        streamed_head="head_on_host" in on_host,
    )
    stored += 0.0 if zero3 else thin_kept_bytes(shape, tokens, a)  # X A^T kept for the recompute
    largest_linear = max(i * o for i, o in shape.projections().values())
    dequant = 2 * largest_linear if a["quant_bits"] < 16 else 0.0  # NF4: one weight at a time, dequantized to bf16
    once = (
        a.get("dequantize_once")
        and a["fused"]
        and a["quant_bits"] == 4
        and strategy not in ("ZeRO-3", "ZeRO-3+offload")
    )
    if once and a["checkpointing"] != "off" and a.get("checkpoint_layers") != 0:
        # dequantize_once: the recompute's copies of the whole layer wait for the backward
        dequant = 2 * sum(i * o for i, o in shape.projections().values())
    dense -= 2 * shape.vocab * shape.hidden * len(on_host)  # tables in pinned host memory
    packed = linear * (a["quant_bits"] / 8) / _WEIGHT_BYTES[a["quant_bits"]]  # what weights_on_host moves (no absmax)
    pinned, back, off_device, on_device = planned_pinned_bytes(
        shape, tokens, a, strategy == "DDP", packed, len(on_host)
    )
    # One host-kept layer's outputs back for the backward above it; where 2 or more layers keep theirs on the GPU,
    # those (the last layers, backward's first) are gone by then (session 16, keep 2: 19.32 -> 19.76 GiB at 1x65536,
    # +0.01 at 1x16384); with one, the layer above the host-kept one holds its own at that moment
    stored += back if a.get("keep_mlp_layers", 0) < 2 else 0
    stored += on_device
    host = sum(pinned.values())
    weights = linear + dense - off_device
    if strategy in ("ZeRO-3", "ZeRO-3+offload"):
        live = _ZERO3_LIVE_LAYERS * linear / shape.layers
        if strategy == "ZeRO-3":
            weights = weights / world + live
        else:
            host += weights / world
            weights = live + dense / world  # embeddings and head come in as their own gathered params
    out = {
        "weights (base model)": weights,
        "LoRA params+grads+AdamW": lora_gpu,
        "activations (checkpointed)": stored,
        "activations (peak phase)": phase,
        "workspace": _FIXED_WORKSPACE + dequant,
    }
    if host or lora_host:
        out["host: offloaded (not on GPU)"] = host + lora_host
    return out


def plan_from_values(
    hf_config: dict,
    quant_bits: int = 4,
    lora_rank: int = 16,
    lora_targets: tuple[str, ...] | list[str] | str = ALL_TARGETS,
    seq_len: int = 2048,
    micro_batch: int = 1,
    checkpointing: str = "on",
    gpu_mem_gib: float = 80.0,
    gpus_per_node: int = 1,
    nodes: int = 1,
    fused: bool = True,
    mlp_chunk_tokens: int | str | None = "auto",
    checkpoint_layers: int | None = None,
    dequantize_once: bool = False,
    keep_mlp_layers: int = 0,
    embeddings_on_host: bool = False,
    head_on_host: bool = False,
    keep_mlp_layers_on_host: int = 0,
    keep_mlp_gate_on_host: int = 0,
    offload_lag: int = 2,
    stash_attention: bool = False,
    last_layer_on_device: bool | int = False,
    weights_on_host: bool = False,
    stash_o_proj: bool = True,
) -> Plan:
    """Predict per-GPU peak memory and pick the cheapest strategy that fits.

    Args:
        hf_config: the model's config.json as a dict (see `load_hf_config`; LLAMA31_8B / LLAMA31_70B for shapes).
        quant_bits: bits per base weight: 4 (NF4), 8 (LLM.int8) or 16 (bf16 LoRA).
        lora_rank: LoRA rank r.
        lora_targets: projection names (q_proj ... down_proj), or "all".
        seq_len: tokens per sequence (a packed row).
        micro_batch: sequences per GPU per forward.
        checkpointing: "off", "on" (layer inputs kept on the GPU) or "offload" (kept in host memory).
        gpu_mem_gib: memory of one GPU in GiB as nvidia-smi reports it (80 GB H100 -> 79.6, H200 -> 139.8).
        gpus_per_node: GPUs per node.
        nodes: nodes.
        fused: raytune_llm's fused kernels (True) or the standard transformers + PEFT stack (False).
        mlp_chunk_tokens: how the fused path splits the MLP over the tokens: a positive int (tokens per
            chunk), 0 or None (not split), "auto" (chunks of 1 GiB of [tokens, intermediate] bf16,
            only past one chunk, as models/tiling.py does). Ignored with fused=False.
        checkpoint_layers: with checkpointing on/offload, how many decoder layers are checkpointed (the
            others keep their activations, as `models.settings.set_checkpoint_layers`); None = all.
        dequantize_once: a checkpointed layer's backward holds all of its weights dequantized (as
            `models.settings.set_dequantize_once`) instead of one at a time.
        keep_mlp_layers: the last checkpointed layers keep their MLP's gate and up outputs
            (`models.settings.set_keep_mlp_layers`).
        embeddings_on_host: the input embedding sits in pinned host memory (`models.settings.set_embeddings_on_host`;
            DDP only, not with a tied head).
        head_on_host: the LM head sits in pinned host memory and the loss streams it in
            (`models.settings.set_head_on_host`; DDP only, not tied).
        keep_mlp_layers_on_host: more checkpointed layers keep those outputs in pinned host memory (offload only;
            `models.settings.set_keep_mlp_layers_on_host`): host bytes, and with fewer than 2 `keep_mlp_layers`
            one layer's on the GPU (in backward). keep_mlp_gate_on_host: more layers keep the gate's alone there
            (`models.settings.set_keep_mlp_gate_on_host`), half the bytes a layer. offload_lag: past 2, one more
            layer's input and stash (and host-kept outputs) on the GPU each (`host_memory.planned_pinned_bytes`).
        stash_attention, last_layer_on_device, stash_o_proj: with offload, what goes to pinned host memory besides
            the layer inputs (`sharding.host_memory.pinned_host_bytes`, the breakdown's host line); an int
            last_layer_on_device N holds N - 2 more layers' inputs and stashes on the GPU at the peak.
        weights_on_host: the layers' base weights in pinned host memory; those of the checkpointed layers less
            about three leave the GPU (DDP, fused; `sharding.host_memory.planned_pinned_bytes`).

    Returns:
        The Plan; `plan.fits` is False with a reason naming the largest component and what to try when no
        strategy fits.

    Raises:
        PlanError: on an unknown value of any argument, with the accepted values.
    """
    if quant_bits not in _WEIGHT_BYTES:
        raise PlanError(f"quant_bits must be one of {sorted(_WEIGHT_BYTES)}, got {quant_bits!r}")
    if checkpointing not in CHECKPOINTING:
        raise PlanError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    if not (
        mlp_chunk_tokens in (None, "auto")
        or (isinstance(mlp_chunk_tokens, int) and not isinstance(mlp_chunk_tokens, bool) and mlp_chunk_tokens >= 0)
    ):
        raise PlanError(f"mlp_chunk_tokens must be a positive int, 0, None or 'auto', got {mlp_chunk_tokens!r}")
    for name, k, also in (
        ("checkpoint_layers", checkpoint_layers, (None,)),
        ("keep_mlp_layers", keep_mlp_layers, ()),
        ("keep_mlp_layers_on_host", keep_mlp_layers_on_host, ()),
        ("keep_mlp_gate_on_host", keep_mlp_gate_on_host, ()),
        ("last_layer_on_device", last_layer_on_device, (True, False)),
    ):
        if not (any(k is a for a in also) or (isinstance(k, int) and not isinstance(k, bool) and k >= 0)):
            raise PlanError(f"{name} must be an int >= 0{''.join(f' or {a}' for a in also)}, got {k!r}")
    if type(offload_lag) is not int or offload_lag < 1:
        raise PlanError(f"offload_lag must be an int >= 1, got {offload_lag!r}")
    targets = ALL_TARGETS if lora_targets in ("all", "all-linear") else tuple(lora_targets)
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise PlanError(f"lora_targets must be a non-empty subset of {ALL_TARGETS} or 'all', got {unknown or targets}")
    for name, value in (
        ("lora_rank", lora_rank),
        ("seq_len", seq_len),
        ("micro_batch", micro_batch),
        ("gpus_per_node", gpus_per_node),
        ("nodes", nodes),
    ):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if gpu_mem_gib <= _RESERVE_GIB:
        raise PlanError(f"gpu_mem_gib must be above {_RESERVE_GIB}, got {gpu_mem_gib!r}")
    shape = Shape.from_hf(hf_config)
    world = gpus_per_node * nodes
    args = dict(
        quant_bits=quant_bits,
        lora_rank=lora_rank,
        lora_targets=targets,
        seq_len=seq_len,
        micro_batch=micro_batch,
        checkpointing=checkpointing,
        fused=fused,
        mlp_chunk_tokens=mlp_chunk_tokens,
        checkpoint_layers=checkpoint_layers,
        dequantize_once=bool(dequantize_once),
        keep_mlp_layers=keep_mlp_layers,
        embeddings_on_host=bool(embeddings_on_host),
        head_on_host=bool(head_on_host),
        keep_mlp_layers_on_host=keep_mlp_layers_on_host,
        keep_mlp_gate_on_host=keep_mlp_gate_on_host,
        offload_lag=offload_lag,
        stash_attention=bool(stash_attention),
        last_layer_on_device=last_layer_on_device,
        weights_on_host=bool(weights_on_host),
        stash_o_proj=bool(stash_o_proj),
    )
    usable = (gpu_mem_gib * _USABLE_FRACTION - _RESERVE_GIB) * GIB
    named = ("quant_bits", "lora_rank", "lora_targets", "seq_len", "micro_batch")  # shown as bits, r, targets, tokens
    inputs = {"layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab, "bits": quant_bits, "r": lora_rank}
    inputs |= {"targets": len(targets), "tokens": f"{micro_batch}x{seq_len}"}
    inputs |= {k: v for k, v in args.items() if k not in named} | {
        "mlp_chunk_tokens": mlp_chunk_tokens if fused else None
    }
    inputs["gpus"] = f"{nodes}x{gpus_per_node}x{gpu_mem_gib:g}GiB"

    breakdowns = {s: _breakdown(shape, s, world, args) for s in STRATEGIES}
    peaks = {s: sum(v for k, v in b.items() if not k.startswith("host")) for s, b in breakdowns.items()}
    why = {
        "DDP": "every GPU holds the whole model and fits; no parameter traffic",
        "ZeRO-2": "the full model fits but DDP's replicated LoRA states do not; ZeRO-2 partitions them",
        "ZeRO-3": f"the base model does not fit replicated ({peaks['DDP'] / GIB:.1f} GiB per GPU with DDP); "
        f"ZeRO-3 divides it over {world} GPUs",
        "ZeRO-3+offload": "only with parameters and optimizer states in host memory (slow; with QLoRA others "
        "measured offload raising GPU memory: check with bench/planner_check.py)",
    }
    for strategy in STRATEGIES:
        if world == 1 and strategy in ("ZeRO-2", "ZeRO-3"):
            continue  # nothing to partition across one GPU
        if peaks[strategy] <= usable:
            return Plan(strategy, True, why[strategy], breakdowns[strategy], usable, world, inputs, peaks)

    best = min(peaks, key=peaks.get)
    b = breakdowns[best]
    biggest = max((k for k in b if not k.startswith("host")), key=b.get)
    return Plan(
        None,
        False,
        _nothing_fits(shape, args, world, gpu_mem_gib, usable, best, b, biggest, peaks[best]),
        b,
        usable,
        world,
        inputs,
        peaks,
    )


def _max_tokens(shape: Shape, args: dict, world: int, usable: float, strategy: str) -> int:
    """The largest micro_batch * seq_len that fits under `strategy` (0 if none), by bisection on tokens."""

    def peak(tokens: int) -> float:
        b = _breakdown(shape, strategy, world, {**args, "seq_len": tokens, "micro_batch": 1})
        return sum(v for k, v in b.items() if not k.startswith("host"))

    if peak(1) > usable:
        return 0
    lo, hi = 1, 1 << 24
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if peak(mid) <= usable else (lo, mid - 1)
    return lo


def _nothing_fits(shape, args, world, gpu_mem_gib, usable, best, b, biggest, peak) -> str:
    tokens = args["seq_len"] * args["micro_batch"]
    head = (
        f"nothing fits because {biggest} needs {b[biggest] / GIB:.1f} GiB and the least-memory strategy "
        f"({best}) peaks at {peak / GIB:.1f} GiB per GPU, over the {usable / GIB:.1f} GiB usable of "
        f"{gpu_mem_gib:g} GiB"
    )
    tries = []
    max_tok = _max_tokens(shape, args, world, usable, best)
    if max_tok == 0:
        tries.append(f"more GPUs (ZeRO-3 over more than {world}) or larger GPUs")
        if args["quant_bits"] > 4:
            tries.append("quant_bits=4 (QLoRA)")
    else:
        if tokens > max_tok:
            tries.append(f"micro_batch x seq_len <= {max_tok:,} tokens (now {tokens:,})")
        if args["checkpointing"] != "offload":
            tries.append("checkpointing=offload")
        if not args["fused"]:
            tries.append("fused=True (chunked cross-entropy, no whole logits)")
        elif not args["mlp_chunk_tokens"]:
            tries.append("mlp_chunk_tokens=auto (the MLP split over the sequence)")
        if args["quant_bits"] > 4:
            tries.append("quant_bits=4")
        tries.append("more GPUs with ZeRO-3")
    return head + "; try " + ", or ".join(tries)


def max_seq_len(hf_config: dict, **kwargs) -> int:
    """The longest seq_len (at the given micro_batch) for which `plan_from_values` finds a strategy.

    Args:
        hf_config: as for `plan_from_values`.
        **kwargs: the other arguments of `plan_from_values` (seq_len is searched).

    Returns:
        The longest fitting seq_len, 0 when even one token does not fit. Found by bisection, which assumes the
        peak grows with seq_len: with checkpointing "off" and mlp_chunk_tokens "auto" it drops where the MLP
        split starts, so pass a fixed mlp_chunk_tokens there.
    """
    kwargs.pop("seq_len", None)
    if not plan_from_values(hf_config, seq_len=1, **kwargs).fits:
        return 0
    lo, hi = 1, 1 << 24
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan_from_values(hf_config, seq_len=mid, **kwargs).fits else (lo, mid - 1)
    return lo


# What `fewest_checkpointed_layers` adds to a plan's peak before holding it against the usable memory: the planner
# has been from -5.1% (no layer checkpointed, 4x2048) to +4.6% of the H200's measured peaks
# (tests/sharding/test_planner_vs_h200.py), and an out-of-memory step costs more than a recomputed layer.
AUTO_MARGIN = 0.08


def fewest_checkpointed_layers(hf_config: dict, **kwargs) -> int | None:
    """The fewest decoder layers to checkpoint (the first ones) for which one GPU holds the run without sharding.

    What `model.checkpoint_layers: auto` trains with: every layer left out of checkpointing keeps its activations
    and is not recomputed, so the step is faster the fewer are checkpointed, as long as the memory holds. The
    plan's DDP peak, plus `AUTO_MARGIN`, must fit its usable memory.

    Args:
        hf_config: as for `plan_from_values`.
        **kwargs: the other arguments of `plan_from_values` (checkpoint_layers is searched; checkpointing must be
            "on" or "offload").

    Returns:
        An int in [0, layers) or None: every layer (also when even that does not fit one GPU, which the run's own
        plan then reports).

    Raises:
        PlanError: as `plan_from_values`, or checkpointing "off".
    """
    kwargs.pop("checkpoint_layers", None)
    if kwargs.get("checkpointing", "on") == "off":
        raise PlanError("checkpoint_layers auto needs checkpointing on or offload")
    layers = Shape.from_hf(hf_config).layers
    for n in range(layers):
        plan = plan_from_values(hf_config, checkpoint_layers=n, **kwargs)
        if plan.alternatives["DDP"] * (1 + AUTO_MARGIN) <= plan.usable_bytes:
            return n
    return None
