"""Run-time settings of a patched model: how its layer loop checkpoints, recomputes and splits the MLP.

`models.patch.patch` keeps a state dict on the causal LM (under `STATE_ATTR`) that the patched forwards read on
every call, and a `PatchReport` mirroring it; the setters here change both, taking effect on the next call,
so one loaded model can be run under several settings (the trainer applies the run's config, the benchmarks
time variants).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from raytune_llm.models.checkpointing import check_mode
from raytune_llm.models.lora import zero3_partitioned
from raytune_llm.models.tiling import check_chunk_tokens

STATE_ATTR = "_raytune_patch_state"


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def set_mlp_chunk_tokens(model: torch.nn.Module, mlp_chunk_tokens: int | str | None) -> None:
    """Change how a patched model splits its MLP calls over tokens (see `patch`); takes effect on the next call.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        mlp_chunk_tokens: a positive int, 0 or None (never), or "auto".

    Raises:
        ValueError: a bad value, or a model `patch` did not patch (stock or unsupported architecture).
    """
    check_chunk_tokens(mlp_chunk_tokens)
    _set_setting(model, "mlp_chunk_tokens", mlp_chunk_tokens)


def set_capture_docs(model: torch.nn.Module, capacity: int | None, longest: int | None = None) -> None:
    """Documents per batch, and the longest document, that a forward recorded into a CUDA graph handles (set by
    `models.graphs.CapturedStep`). Read only while a graph is captured: packed rows then take varlen attention with
    this many document bounds, found on the GPU (`models.attention.cu_seqlens`: nothing read on the host), and
    ``longest`` (None: the row length) as the longest document.

    Raises:
        ValueError: not positive ints (or None), or a model `patch` did not patch (stock forwards read the
            document bounds on the host and cannot record packed rows).
    """
    for name, n in (("capture_docs", capacity), ("capture_longest", longest)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {n!r}")
    _set_setting(model, "capture_docs", capacity)
    _set_setting(model, "capture_longest", longest)


def _set_setting(model: torch.nn.Module, name: str, value) -> None:
    """Set a patched model's run-time setting (read by the patched forwards) and its report's copy."""
    state = causal_lm(model).__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError(f"set_{name} needs a model patched by raytune_llm.patch (fused=True)")
    state[name] = value
    setattr(state["report"], name, value)


def _set_count(model: torch.nn.Module, name: str, n: int) -> None:
    """`_set_setting` for a count, refusing anything but an int >= 0."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    _set_setting(model, name, n)


def _set_flag(model: torch.nn.Module, name: str, on: bool) -> None:
    """`_set_setting` for a true/false setting, refusing anything but a bool."""
    if not isinstance(on, bool):
        raise ValueError(f"{name} must be true or false, got {on!r}")
    _set_setting(model, name, on)


def check_checkpoint_layers(value: int | None) -> None:
    """Raise ValueError unless `value` is None or an int >= 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"checkpoint_layers must be an integer >= 0 or null (all layers), got {value!r}")


def set_checkpoint_layers(model: torch.nn.Module, checkpoint_layers: int | None) -> None:
    """Checkpoint only the first `checkpoint_layers` decoder layers (None: all); takes effect on the next call.

    With gradient checkpointing on or offload, the remaining (last) layers keep their activations from
    forward to backward and are not recomputed: less recomputation for more memory (selective
    recomputation). The last layers are the ones left out because backward reaches them first, so their
    activations are freed earliest. No effect with checkpointing off.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        checkpoint_layers: an int >= 0, or None for every layer.

    Raises:
        ValueError: a bad value, or a model `patch` did not patch (stock or unsupported architecture).
    """
    check_checkpoint_layers(checkpoint_layers)
    _set_setting(model, "checkpoint_layers", checkpoint_layers)


def set_dequantize_once(model: torch.nn.Module, on: bool) -> None:
    """Dequantize each NF4 weight of a checkpointed layer once for its recompute and its backward.

    Off (the default), backward dequantizes every NF4 weight twice per step after the forward's own
    pass: once in the layer's recomputed forward, once for ``dX``. On, the recompute's copies are kept
    until the backward has used them (`kernels.lora.dequantize_once`): one dequantization pass fewer per
    step, for one layer's weights in bf16 held during that layer's backward (0.44 GiB at 8B, 1.6 GiB at
    70B). Takes effect on the next call; no effect on layers that are not checkpointed.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        on: True to reuse the recompute's dequantized weights in backward.

    Raises:
        ValueError: a non-bool value, or a model `patch` did not patch.
    """
    _set_flag(model, "dequantize_once", on)


def set_after_layer_backward(model: torch.nn.Module, fn: Callable[[int], None] | None) -> None:
    """Call `fn(i)` each time checkpointed decoder layer i's backward (recompute included) is done; None: nothing.

    The trainer sets it under DeepSpeed ZeRO-3 (`sharding.engine.frozen_releaser`): DeepSpeed keeps the frozen
    weights a recompute gathers until the whole backward ends, so without it a QLoRA backward ends holding the
    entire gathered base on every GPU. Takes effect on the next call.

    Raises:
        ValueError: `fn` is neither callable nor None, or a model `patch` did not patch.
    """
    if fn is not None and not callable(fn):
        raise ValueError(f"after_layer_backward must be callable or None, got {fn!r}")
    state = causal_lm(model).__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError("set_after_layer_backward needs a model patched by raytune_llm.patch (fused=True)")
    state["after_layer_backward"] = fn


def set_stash_attention(model: torch.nn.Module, on: bool, o_proj: bool = True) -> None:
    """Keep each checkpointed layer's attention in host memory and replay it in the recompute (offload only).

    With gradient checkpointing "offload", the forward copies what attention's backward needs (q, k, v,
    output, log-sum-exp) to pinned host memory next to the layer input, and the recompute replays it
    instead of running the attention forward again; with `lean_recompute` (and no q/k norm) the recompute
    also skips the Q/K/V base GEMMs. With `o_proj` (and the fused O projection) the kept block ends after the
    O projection: its output and the adapter's small saved tensors are copied too, and the recompute skips
    that GEMM. Same gradients; more host memory and host-device traffic (about 2.5x the layer inputs', 3.5x
    with `o_proj`). No effect in the other modes. Takes effect on the next call.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        on: True to stash attention.
        o_proj: include the O projection in what is kept and replayed.

    Raises:
        ValueError: a non-bool value, or a model `patch` did not patch.
    """
    _set_flag(model, "stash_attention", on)
    _set_flag(model, "stash_o_proj", o_proj)


def set_gradient_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Switch a patched model's checkpointing mode ("off", "on", "offload"); takes effect on the next call.

    Raises:
        ValueError: a bad mode, or a model `patch` did not patch.
    """
    check_mode(mode)
    _set_setting(model, "gradient_checkpointing", mode)


def set_lean_recompute(model: torch.nn.Module, on: bool) -> None:
    """Let a checkpointed layer's recompute skip the fused MLP's down projection (on by default).

    The patched families are pre-norm decoders: the MLP output is added to the residual stream and
    nothing else reads it, so backward needs none of its values and the recompute leaves out a quarter
    of the layer's forward GEMMs (`kernels.lora.lean_recompute`). The gradients are those of the full
    recompute. Off runs the whole layer again, for comparing the two. Takes effect on the next call.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        on: True to skip the down projection in recomputes.

    Raises:
        ValueError: a non-bool value, or a model `patch` did not patch.
    """
    _set_flag(model, "lean_recompute", on)


def set_fused_residuals(model: torch.nn.Module, on: bool) -> None:
    """Run each decoder layer's residual adds inside its RMSNorm kernels (on by default).

    ``h = x + attn`` and the post-attention norm of ``h`` are one kernel each way (`kernels.rms_norm.add_rms_norm`),
    the layer input's two gradients are summed inside the input norm's backward (`rms_norm_residual`), and inside
    a recompute the last add keeps no values (`models.checkpointing.residual_add`). Same bits as the separate adds;
    off runs the layer's own forward, for comparing the two. Layers of another shape than attention, MLP and their
    two RMSNorms, and norms ZeRO-3 partitions, always run their own forward. Takes effect on the next call.

    Raises:
        ValueError: a non-bool value, or a model `patch` did not patch.
    """
    _set_flag(model, "fused_residuals", on)


def set_last_layer_on_device(model: torch.nn.Module, on: bool | int) -> None:
    """Under offloaded checkpointing, keep the last layer's input and attention stash on the device (off by default);
    an int N: the last N layers' (true is 1; never layer 0's).

    Backward reaches the last layer first. Offloaded, its input and stash are copied to the host during the forward, yet
    the device storages they were copied from are freed only when backward starts (`attention_stash.release_copied`),
    and `OffloadChain.prefetch_last` brings the copies back beside them for the loss: twice on the device at the loss
    (~0.3 GiB at 4x2048 tokens of an 8B model) and ~0.6 GB over PCIe for nothing (both by size). On keeps the storages
    themselves. Same bits. H200, 8B (session 14): 1x16384 1,551 -> 1,540 ms a step at the same peak; 4x2048 as a CUDA
    graph 589.1 -> 587.9 ms at +0.06 GiB (the loss is not that step's peak). Each further layer holds its input and
    stash on the device until its backward (576 MiB at 16,384 tokens of 8B, by size) and takes them off the PCIe link
    both ways, where the forward's copies to the host bound how many layers can keep their MLP outputs there
    (`set_keep_mlp_layers_on_host`, which skips these layers). The second adds nothing to the peak: its copies would be
    back for the last layer's backward anyway (session 18, 1x65536: N = 1 -> 2 +0.01 GiB, and with the host memory it
    frees a 14th host-kept layer, 11,156 -> 11,120 ms; 1x16384: N = 3 / 4 +0.69 / +1.26 GiB). Off by default;
    `model.last_layer_on_device`, on in conf/llama3_8b_qlora.yaml. Takes effect on the next call.

    Raises:
        ValueError: neither a bool nor an int >= 0, or a model `patch` did not patch.
    """
    if not isinstance(on, bool) and (not isinstance(on, int) or on < 0):
        raise ValueError(f"last_layer_on_device must be true, false or a layer count >= 0, got {on!r}")
    _set_setting(model, "last_layer_on_device", on)


def set_embeddings_on_host(model: torch.nn.Module, on: bool) -> None:
    """Keep a frozen input embedding in pinned host memory; the GPU reads the rows of each batch over PCIe.

    The input embedding of a QLoRA run is frozen and read one row per token, yet it takes GPU memory
    (vocab x hidden in bf16: 0.98 GiB at Llama-3.1-8B, 1.96 GiB at 70B, by size; the 8B peak at 4x2048 measured
    1.10 GiB lower on the H200). On, its weight moves to pinned host
    memory and the patched embedding gathers each batch's rows with `kernels.embedding` (zero-copy, no host
    synchronisation; it records into a CUDA graph). Off moves it back to the device it came from. Only where
    the weight stays whole on one device: the trainer does not use it under DeepSpeed. No effect while the
    weight is already on the host (a CPU run). Takes effect at once.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        on: True to move the input embedding to pinned host memory, False to bring it back.

    Raises:
        ValueError: a non-bool value, a model `patch` did not patch, an embedding the patch left stock, a
            trainable embedding, or one tied to the LM head (the head reads the same weight on the GPU).
    """
    lm, state = _host_setting(model, "embeddings_on_host", on)
    embed = lm.get_input_embeddings()
    weight = embed.weight
    if on:
        if "model.embed_tokens" in state["report"].stock:
            raise ValueError(f"embeddings_on_host: {state['report'].stock['model.embed_tokens']}")
        if weight.requires_grad:
            raise ValueError("embeddings_on_host needs a frozen input embedding; this one is trained")
        head = lm.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is weight:
            raise ValueError(
                "embeddings_on_host: the input embedding is tied to the LM head (tie_word_embeddings), "
                "which reads it on the GPU; leave it on the device"
            )
        _to_host(lm, state, "embed", weight)
    else:
        _back_home(state, "embed", weight)
    state["report"].embeddings_on_host = state.get("embed_home") is not None  # moved off a GPU


def set_head_on_host(model: torch.nn.Module, on: bool) -> None:
    """Keep a frozen LM head in pinned host memory; the loss streams it in over PCIe, chunk by chunk.

    The head of a QLoRA run is frozen and read only by the loss, yet it takes vocab x hidden of GPU memory for the
    whole step (0.98 GiB at Llama-3.1-8B in bf16, by size). On, its weight moves to pinned host memory and the
    patched loss runs `kernels.cross_entropy_streamed`: 4096-row chunks come over on a side stream, two buffers in
    turn, under an online softmax, with two chunks, a logits chunk and an fp32 ``[tokens, hidden]`` accumulator of
    device memory. H200, 8B, 4x2048 as a CUDA graph (session 14): peak 0.92 GiB lower, 587.6 -> 586.8 ms a step. The
    loss is the same up to fp32 rounding order, the hidden-state gradient within a bf16 rounding. The head's 1 GB
    crosses PCIe each step, hidden behind the loss's GEMMs only from roughly 6,000 tokens a step (at 2,048 the loss
    waits ~19 ms on it, by the copy rate: keep the head on the device for short steps). Logits (no labels), calls the
    patch leaves to the model's own forward and `generate` bring the head back to its device while they run. Only
    where the weight stays whole on one device: the trainer does not use it under DeepSpeed. On a CPU run nothing
    moves, but the loss still takes the streamed path. Takes effect at once.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        on: True to move the LM head to pinned host memory, False to bring it back.

    Raises:
        ValueError: a non-bool value, a model `patch` did not patch, a head the fused loss cannot take (not a
            plain bias-free Linear, or a stock loss), a trainable head, one tied to the input embedding or
            partitioned by ZeRO-3, or a call while `weights_on_device` holds the weights.
    """
    lm, state = _host_setting(model, "head_on_host", on)
    head = lm.get_output_embeddings()
    if on:
        # The loss the patch would leave stock (it would bring the head back every step), as patch decides per call.
        why = state["report"].stock.get("lm_head.loss") or head_loss_reason(head)
        if why is not None:
            raise ValueError(f"head_on_host: the loss is stock ({why})")
        if head.weight is getattr(lm.get_input_embeddings(), "weight", None):
            raise ValueError(
                "head_on_host: the LM head is tied to the input embedding (tie_word_embeddings); leave it on the device"
            )
        _to_host(lm, state, "head", head.weight)
    else:
        _back_home(state, "head", head.weight)
    state["head_on_host"] = on
    state["report"].head_on_host = state.get("head_home") is not None  # moved off a GPU


def set_weights_on_host(model: torch.nn.Module, on: bool) -> None:
    """Keep the decoder layers' frozen base weights in pinned host memory, each layer's brought in as it runs.

    `models.host_weights`: the patched layer loop copies layer ``i + 1``'s weights to the GPU while layer ``i``
    runs and a checkpointed layer's backward brings its own back (started by the layer above it), so of the
    checkpointed layers about three have theirs on the GPU at a time instead of all of them (3.25 GiB of packed NF4
    at Llama-3.1-8B; the quant state, 0.1 GiB, stays), for `keep_mlp_layers` to spend. A layer that is not
    checkpointed keeps its weights on the GPU while training (its backward reads them). Costs a layer's weights
    over PCIe host-to-device in its forward and again in its backward. The same bits: the kernels read the same
    bytes. `generate` and the calls the patch leaves to the model's own forward bring every layer's back while they
    run (a stock call with grad leaves them for its backward), `unpatch` for good. Only where the weights stay whole
    on one device: the trainer does not use it under DeepSpeed. Takes effect on the next call.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        on: True to move the layers' base weights to the host, False to bring them back.

    Raises:
        ValueError: a non-bool value, a model `patch` did not patch, a layer without LoRA base weights or with
            ZeRO-3 partitioned ones, or a call while `weights_on_device` holds the weights.
    """
    from raytune_llm.models.host_weights import LayerWeights, layer_base_weights

    lm, state = _host_setting(model, "weights_on_host", on)
    current = state.get("host_weights")
    if on and "model" in state["report"].stock:  # the model's own layer loop would read them on the host
        raise ValueError(f"weights_on_host: the layer loop is stock ({state['report'].stock['model']})")
    if on and current is None:
        layers = lm.get_decoder().layers
        params = [layer_base_weights(layer) for layer in layers]
        if not all(params):
            raise ValueError("weights_on_host: a decoder layer has no frozen LoRA base weights to move")
        if any(zero3_partitioned(p) for ps in params for p in ps):
            raise ValueError("weights_on_host: DeepSpeed ZeRO-3 partitioned the base weights; it places them itself")
        state["host_weights"] = [LayerWeights(ps, ps[0].device) for ps in params]
        _device_while_generating(lm, state)
    elif not on and current is not None:
        for weights in current:
            weights.restore()
        state["host_weights"] = None
    hw = state.get("host_weights")
    state["report"].weights_on_host = hw is not None
    state["report"].host_weight_bytes = sum(w.pinned_bytes for w in hw) if hw else 0


def _to_host(lm: torch.nn.Module, state: dict, key: str, weight: torch.nn.Parameter) -> None:
    """Move a frozen weight to pinned host memory, remembering its device (state ``KEY_home``, ``KEY_host``)."""
    if not weight.is_cuda:
        return
    host = state.get(f"{key}_host")
    if host is None or host.shape != weight.shape or host.dtype != weight.dtype:
        host = weight.data.to("cpu").pin_memory()
    else:  # the pinned copy of an earlier move: refreshed, the weight may have been loaded since
        host.copy_(weight.data)
    state[f"{key}_home"], state[f"{key}_host"] = weight.device, host
    weight.data = host
    _device_while_generating(lm, state)


def _back_home(state: dict, key: str, weight: torch.nn.Parameter) -> torch.device | None:
    """Move a weight `_to_host` moved back to its device (the pinned copy stays for the next move); the device, or
    None when it was not on the host or has been replaced since (then it is left as it is). Either way no longer
    counted as on the host."""
    home, host = state.get(f"{key}_home"), state.get(f"{key}_host")
    state[f"{key}_home"] = None
    if home is None or host is None or weight.data_ptr() != host.data_ptr():
        return None
    weight.data = weight.data.to(home)
    return home


@contextlib.contextmanager
def weights_on_device(
    lm: torch.nn.Module, keys: tuple[str, ...] = ("embed", "head"), release: bool | None = None
) -> Iterator[None]:
    """While inside, the input embedding (``"embed"``) and the LM head (``"head"``) are back on their devices if
    they were moved to the host, and with ``"embed"`` every decoder layer's base weights (`set_weights_on_host`),
    which stay bound after a call made with grad (its backward reads them) unless ``release`` says otherwise
    (`generate`: True).

    For `generate` and for the calls the patch leaves to the model's own forward (which read them on the GPU). The
    frozen weights are not written by training, so the pinned copies stay and moving back costs no host allocation;
    a write to them while inside is lost. A weight replaced since it was moved (a load with ``assign``, ``.to()``,
    a wrapper) is left as it is, and no longer counted as on the host. Moving the weights to or from the host is
    refused while inside (`_host_setting`); after `unpatch` inside, they stay on the device.
    """
    state = lm.__dict__.get(STATE_ATTR)
    if state is None:
        yield
        return
    moved, layers = [], None
    state["borrowed"] = state.get("borrowed", 0) + 1
    try:
        for key, module in (("embed", lm.get_input_embeddings()), ("head", lm.get_output_embeddings())):
            if key in keys and (home := _back_home(state, key, module.weight)) is not None:
                moved.append((key, module, home))
        # a stock forward reads every layer's weights: bound by the outermost call; left bound after one with grad
        # (its backward reads them; the next patched forward lets the checkpointed layers' go again)
        outer = "embed" in keys and state["borrowed"] == 1
        layers = state.get("host_weights") if outer else None
        for weights in layers or []:
            weights.bind()
        yield
    finally:
        let_go = not torch.is_grad_enabled() if release is None else release
        if layers is not None and state.get("host_weights") is layers and let_go:
            for weights in layers:  # not unpatched or moved back inside
                weights.unbind()
        state["borrowed"] -= 1
        if lm.__dict__.get(STATE_ATTR) is state:  # not unpatched inside
            for key, module, home in moved:
                module.weight.data = state[f"{key}_host"]
                state[f"{key}_home"] = home


def bring_home(lm: torch.nn.Module, state: dict) -> None:
    """Both host weights back on their devices (`unpatch`: the stock forwards read them there); also while
    `weights_on_device` has them, which then leaves them there."""
    _back_home(state, "embed", lm.get_input_embeddings().weight)
    _back_home(state, "head", lm.get_output_embeddings().weight)
    for weights in state.get("host_weights") or []:
        weights.restore()
    state["host_weights"] = None


def head_loss_reason(head: torch.nn.Module | None) -> str | None:
    """Why the fused loss cannot read this LM head (it then runs stock), or None: `models.patch` asks per call, as
    PEFT may freeze or wrap the head after patching; `set_head_on_host` asks before moving it."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"lm_head is {type(head).__name__} (fused loss takes a plain bias-free Linear)"
    if head.weight.requires_grad:
        return "lm_head weight is trainable"
    if zero3_partitioned(head.weight):
        return "DeepSpeed ZeRO-3 partitioned lm_head"
    return None


def _host_setting(model: torch.nn.Module, name: str, on: bool) -> tuple[torch.nn.Module, dict]:
    """The causal LM and patch state a host-weight setter works on, after the checks both setters share."""
    if not isinstance(on, bool):
        raise ValueError(f"{name} must be true or false, got {on!r}")
    lm = causal_lm(model)
    state = lm.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError(f"set_{name} needs a model patched by raytune_llm.patch (fused=True)")
    if state.get("borrowed"):
        raise ValueError(f"{name} cannot change while generate or a stock call has the weights on the device")
    return lm, state


def _device_while_generating(lm: torch.nn.Module, state: dict) -> None:
    """Generation brings the host weights back to their devices while it runs.

    transformers takes a model's device from its first parameter, the input embedding: on the host, `generate`
    would put the prompt on the CPU; and every generated token would read the whole head over PCIe.
    """
    if getattr(lm.__dict__.get("generate"), "_raytune_host_embedding", False):
        return
    original = lm.generate

    def generate(*args, **kwargs):
        with weights_on_device(lm, release=True):  # generate runs without grad inside, not around this
            return original(*args, **kwargs)

    generate._raytune_host_embedding = True  # unpatch removes this wrapper, and only this one
    lm.generate = generate


def set_keep_mlp_layers_on_host(model: torch.nn.Module, layers: int) -> None:
    """Let `layers` more checkpointed decoder layers keep their MLP's gate and up outputs, in pinned host memory.

    `set_keep_mlp_layers` holds the kept outputs on the device, 448 MiB a layer at 4x2048 tokens of Llama-3.1-8B,
    and the memory cap stops it there. These layers copy theirs to the host in the forward (with the layer's input
    and attention stash, on the offload side stream) and bring them back with them, one layer ahead of their
    backward: on the device one layer's at a time, during the backward of the layer above it (after the device-kept
    layers, whose outputs make the step's peak at backward's start, are gone), and their recompute runs no MLP GEMM
    either, with the same bits. The cost is PCIe time: 2 x tokens x intermediate x 2 bytes each way (8 ms at 55
    GB/s at 4x2048), which the forward has to spare only where its own copies leave room, and pinned host memory
    (`sharding.host_memory` counts it; a GPU worker refuses a run its node cannot hold). So the layers are spread
    evenly over the checkpointed layers below the device-kept ones (from the last of them down; never the last layer,
    whose copies would come straight back beside the forward's own). H200, 8B (session 16): 4x2048 slower (keep 6,
    +1 / +2 / +4 layers: 588.3 -> 590.8 / 596.7 / 608.8 ms; the forward's copies fill 86% of it); 1x16384 keep 4,
    +8: 1,554.1 -> 1,538.7 ms; 1x65536 keep 2, +12: 11,523 -> 11,248 ms. Only with offloaded checkpointing
    (ignored otherwise) and `lean_recompute`. Takes effect on the next call.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        layers: an int >= 0.

    Raises:
        ValueError: a bad value, or a model `patch` did not patch.
    """
    _set_count(model, "keep_mlp_layers_on_host", layers)


def set_keep_mlp_gate_on_host(model: torch.nn.Module, layers: int) -> None:
    """Let `layers` more checkpointed decoder layers keep their MLP's gate output alone in pinned host memory.

    Half of what a `set_keep_mlp_layers_on_host` layer sends over PCIe and pins (tokens x intermediate x 2 bytes: 1.75
    GiB at 65,536 tokens of Llama-3.1-8B), for half its saving: the recompute runs the up GEMM again, not the gate's
    (7.7 TFLOP at 65,536 tokens of 8B, ~10.5 ms at the H200's measured matmul rate; not timed yet), and the backward
    kernel finishes the up output as the forward did, the same bits. For the host memory a whole layer's 3.5 GiB does
    not fit in. These layers are spread evenly over the checkpointed layers below the device-kept ones that
    `set_keep_mlp_layers_on_host` left, from the top, those with no host-kept neighbour first
    (`checkpointing.host_gate_layers`). Only with offloaded checkpointing (ignored otherwise) and
    `lean_recompute`; `sharding.host_memory` counts the pinned bytes. Takes effect on the next call.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        layers: an int >= 0.

    Raises:
        ValueError: a bad value, or a model `patch` did not patch.
    """
    _set_count(model, "keep_mlp_gate_on_host", layers)


def set_offload_lag(model: torch.nn.Module, layers: int) -> None:
    """Under offloaded checkpointing, let the copies to the host of this many layers be in flight (2 by default).

    A checkpointed layer's forward copies its input, attention stash and host-kept MLP outputs to pinned host memory
    on a side stream; the device storages they are read from are freed on the compute stream, which first waits for
    those copies (no `record_stream`: `attention_stash.release_copied`). With 2, layer i's forward waits for layer
    i - 2's copies. Where the copies fill the PCIe link in bursts (a host-kept layer's 1.5 GiB at 16,384 tokens of
    8B, 2 to 3 times a plain layer's), a larger lag lets the burst run under more layers' compute, for the storages
    of one more layer held during the forward (576 MiB at 16,384 tokens, 1.5 GiB for a host-kept layer; the planner
    counts the layers in flight as the forward ends, `sharding.host_memory.planned_pinned_bytes`); backward's start
    still waits for every copy. 1: each layer waits for the one before it. H200, 8B, 1x16384, 8 host-kept layers:
    3 against 2 -19.5 ms a step at +0.34 GiB (session 19). Only with offloaded checkpointing. Takes effect on the
    next call.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        layers: an int >= 1.

    Raises:
        ValueError: a bad value, or a model `patch` did not patch.
    """
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"offload_lag must be an integer >= 1, got {layers!r}")
    _set_setting(model, "offload_lag", layers)


def set_keep_mlp_layers(model: torch.nn.Module, layers: int) -> None:
    """Let the last `layers` checkpointed decoder layers keep their MLP's gate and up outputs; 0: none (default).

    Under the lean recompute with a replayed attention, a checkpointed layer's recompute runs two GEMMs: the
    MLP's gate and up (2 x 1.23 ms a layer at 4x2048 tokens of Llama-3.1-8B on the H200). A kept layer holds
    their outputs from its forward to its backward instead (2 x tokens x intermediate in the compute dtype:
    448 MiB at 4x2048 tokens of 8B, 896 MiB at 16k) and its recompute runs no MLP GEMM; the gradients are the
    same bits (`kernels.lora.keep_mlp_outputs`). The last layers are the ones chosen because backward reaches
    them first: with every layer checkpointed, the last one's outputs are freed when the step's first layer
    backward would have rebuilt them anyway, so keeping one layer adds little or nothing to the peak and each
    further one adds its outputs (with `checkpoint_layers` below the depth, every kept layer adds them). An MLP
    split over tokens (`mlp_chunk_tokens`) keeps nothing. Needs `lean_recompute` (the default); no effect with
    checkpointing off. Takes effect on the next call.

    Args:
        model: a model `patch` patched (PEFT wrapper or causal LM).
        layers: an int >= 0.

    Raises:
        ValueError: a bad value, or a model `patch` did not patch.
    """
    _set_count(model, "keep_mlp_layers", layers)
