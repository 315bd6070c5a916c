"""What `models.patch.patch` did to a model, and the run-time settings it holds (`models.settings` keeps them in step)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PatchReport:
    """What `patch` did.

    Attributes:
        family: the family name, or None for an unsupported architecture.
        replaced: `"module.path: kernel"` for each forward swapped in.
        stock: module path -> reason it keeps its stock forward (or a stock sub-step).
        gradient_checkpointing: the mode the patched forward runs ("off", "on", "offload").
        mlp_chunk_tokens: how each MLP call is split over its tokens (an int, "auto", or None = never).
        checkpoint_layers: with checkpointing on/offload, how many decoder layers (from the first) are
            checkpointed; the others keep their activations and are not recomputed. None = all.
        dequantize_once: a checkpointed layer's backward reuses the NF4 weights its recompute dequantized.
        lean_recompute: a checkpointed layer's recompute skips the fused MLP's down projection, whose output
            backward never reads (`kernels.lora.lean_recompute`).
        stash_attention: with offloaded checkpointing, each layer's attention is kept in host memory by the
            forward and replayed by the recompute (`models.attention_stash`).
        stash_o_proj: with stash_attention, the kept and replayed block includes the fused O projection.
        capture_docs: documents per batch a forward recorded into a CUDA graph handles (`models.graphs`);
            capture_longest: the longest document it handles (None: the row length).
        embeddings_on_host: the frozen input embedding sits in pinned host memory (`settings.set_embeddings_on_host`).
        keep_mlp_layers: how many of the last checkpointed layers keep their MLP's gate and up outputs from
            forward to backward, so their recompute runs no MLP GEMM (`settings.set_keep_mlp_layers`).
        keep_mlp_layers_on_host: how many more checkpointed layers keep those outputs in pinned host memory
            (`settings.set_keep_mlp_layers_on_host`); keep_mlp_gate_on_host: how many more keep the gate's alone
            there (`settings.set_keep_mlp_gate_on_host`).
        offload_lag: under offloaded checkpointing, layer i's forward waits for layer i - offload_lag's copies to
            the host (`settings.set_offload_lag`).
        fused_residuals: each layer's residual adds run inside its RMSNorm kernels, and a recompute's last add
            keeps no values (`settings.set_fused_residuals`; which layers do: `replaced`).
        last_layer_on_device: with offloaded checkpointing, the last layer's input and attention stash stay on the
            device; an int: the last that many layers' (`settings.set_last_layer_on_device`).
        head_on_host: the frozen LM head sits in pinned host memory and the loss streams it in
            (`settings.set_head_on_host`).
        weights_on_host: the decoder layers' base weights sit in pinned host memory, each layer's brought in as
            it runs (`settings.set_weights_on_host`); host_weight_bytes: how many bytes that is.
    """

    family: str | None
    replaced: list[str] = field(default_factory=list)
    stock: dict[str, str] = field(default_factory=dict)
    gradient_checkpointing: str = "off"
    mlp_chunk_tokens: int | str | None = None
    checkpoint_layers: int | None = None
    dequantize_once: bool = False
    lean_recompute: bool = True
    stash_attention: bool = False
    stash_o_proj: bool = True
    capture_docs: int | None = None
    capture_longest: int | None = None
    embeddings_on_host: bool = False
    keep_mlp_layers: int = 0
    keep_mlp_layers_on_host: int = 0
    keep_mlp_gate_on_host: int = 0
    offload_lag: int = 2
    fused_residuals: bool = False
    last_layer_on_device: bool | int = False
    head_on_host: bool = False
    weights_on_host: bool = False
    host_weight_bytes: int = 0

    def __str__(self) -> str:
        lines = [f"raytune_llm patch: family={self.family}, {len(self.replaced)} replaced, {len(self.stock)} stock"]
        lines += [f"  stock {name}: {why}" for name, why in self.stock.items()]
        return "\n".join(lines)
