"""Swap the fused kernels into a transformers (+ PEFT) causal LM, per instance and reversibly.

`patch(model)` replaces the `forward` of module instances (never a class, never a transformers module
global) and records the originals on the model so `unpatch(model)` restores them exactly:

- every RMSNorm of the decoder (input / post-attention / final, and Qwen3's q/k norms) -> kernels.rms_norm;
- each attention: q/k/v through kernels.lora_qkv, RoPE through kernels.rope, attention through
  models.attention (document-masked for packed rows), o_proj through kernels.lora_linear;
- each MLP -> kernels.lora_mlp (or stock projections + kernels.swiglu when a projection cannot fuse),
  split over the tokens by models.tiling when `mlp_chunk_tokens` asks for it (long sequences, see there);
- the inner model's forward: builds the attention metadata once, runs the layers (checkpointed when
  asked, see models.checkpointing) and never builds HF's 4D mask;
- each decoder layer, for the patched loop's calls: its residual adds inside the RMSNorm kernels
  (kernels.rms_norm.add_rms_norm / rms_norm_residual; `settings.set_fused_residuals`);
- the input embedding: kernels.embedding when `settings.set_embeddings_on_host` moved its table to pinned
  host memory (the stock lookup otherwise);
- the causal LM's forward: with labels, the loss goes through kernels.fused_linear_cross_entropy (or
  kernels.cross_entropy_streamed when `settings.set_head_on_host` put the head on the host) and logits are never
  materialised (`.logits` is None); without labels, logits as HF computes them.

What cannot fuse falls back per layer, per call, to the stock module (a LoRA projection with dropout > 0
or a bias, DoRA, merged adapters, a missing kernel); the returned PatchReport lists what was replaced
and what stayed stock, with the reason. Generation (a KV cache), `output_attentions` /
`output_hidden_states`, or a 4D mask run the original forwards, so `generate` keeps working.
An architecture outside the four families is left entirely stock with one warning.
"""

from __future__ import annotations

import functools
import importlib
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from raytune_llm.kernels.lora import keep_mlp_outputs, lean_qkv_active
from raytune_llm.models import attention_stash
from raytune_llm.models.attention import AttnMeta, build_attn_meta, causal_attention, one_kernel_path
from raytune_llm.models.checkpointing import (
    OffloadChain,
    check_mode,
    checkpoint_layer,
    host_gate_layers,
    host_kept_layers,
    residual_add,
)
from raytune_llm.models.families import FamilySpec, family_of
from raytune_llm.models.host_weights import stream_layers
from raytune_llm.models.lora import base_weight, lora_weight, zero3_partitioned
from raytune_llm.models.report import PatchReport
from raytune_llm.models.settings import STATE_ATTR, bring_home, causal_lm, head_loss_reason, weights_on_device
from raytune_llm.models.tiling import check_chunk_tokens, chunk_tokens_for, tiled_over_tokens


def _op(module: str, name: str) -> Callable | None:
    """A kernels functional, or the reference of the same name while its kernel file is missing."""
    for path in (f"raytune_llm.kernels.{module}", "raytune_llm.kernels.reference"):
        try:
            fn = getattr(importlib.import_module(path), name, None)
        except ImportError:
            fn = None
        if fn is not None:
            return fn
    return None


def _set_forward(state: dict, module: torch.nn.Module, fn: Callable) -> None:
    state["originals"].append((module, module.__dict__.get("forward")))
    module.forward = types.MethodType(fn, module)


def _original(state: dict, module: torch.nn.Module) -> Callable:
    """The forward `module` had before patching, bound to it."""
    for m, own in state["originals"]:
        if m is module:
            return own if own is not None else types.MethodType(type(module).forward, module)
    raise KeyError("module was not patched")


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def _fused_weights(modules: list[torch.nn.Module]) -> tuple[list, list] | None:
    weights, biases = [], []
    for m in modules:
        w, b, reason = lora_weight(m)
        if reason is not None:
            return None
        weights.append(w)
        biases.append(b)
    return weights, biases


def _reasons(prefix: str, names: list[str], modules: list[torch.nn.Module]) -> str | None:
    for name, m in zip(names, modules):
        _, _, reason = lora_weight(m)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def _norm_eps(norm: torch.nn.Module) -> float | None:
    """An RMSNorm module's epsilon, or None when it has no weight or no epsilon this patch knows."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if getattr(norm, "weight", None) is None else eps


def _patch_norm(state: dict, report: PatchReport, name: str, norm: torch.nn.Module, rms_norm: Callable) -> None:
    eps = _norm_eps(norm)
    if eps is None:
        report.stock[name] = f"{type(norm).__name__} has no weight/eps"
        return

    def forward(self, x):
        return rms_norm(x, self.weight, eps)

    _set_forward(state, norm, forward)
    report.replaced.append(f"{name}: rms_norm")


def _patch_attention(
    state: dict, report: PatchReport, name: str, attn, family: FamilySpec, layer_idx: int, ops
) -> None:
    config = attn.config
    window = family.sliding_window(config, layer_idx)
    original = _original_later(state, attn)
    qkv_mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    why = _reasons(name, ["q_proj", "k_proj", "v_proj"], qkv_mods)
    if why is None and ops["lora_qkv"] is None:
        why = "kernels.lora_qkv not available"
    if why:
        report.stock[f"{name}.qkv"] = why
    why_o = _reasons(name, ["o_proj"], [attn.o_proj])
    if why_o is None and ops["lora_linear"] is None:
        why_o = "kernels.lora_linear not available"
    if why_o:
        report.stock[f"{name}.o_proj"] = why_o

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if not isinstance(attention_mask, AttnMeta) or past_key_values is not None:
            return original()(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        b, s, _ = hidden_states.shape
        # Modules are looked up per call: PEFT may wrap q_proj etc. after patching.
        qkv = _fused_weights([self.q_proj, self.k_proj, self.v_proj]) if ops["lora_qkv"] is not None else None
        if qkv is not None:
            (wq, wk, wv), (bq, bk, bv) = qkv
            q, k, v = ops["lora_qkv"](hidden_states, wq, wk, wv)
            q, k, v = _add_bias(q, bq), _add_bias(k, bk), _add_bias(v, bv)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q = q.view(b, s, -1, self.head_dim)
        k = k.view(b, s, -1, self.head_dim)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        if family.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # Transposed views: the RoPE kernel reads them in place and writes new tensors in the same [B, S, H, D]
        # memory layout (one pass; a .contiguous() copy first would read and write q and k once more), so q, k
        # and v reach attention in one layout and its output reshapes to [B, S, H*D] without a copy. The rotary
        # embedding of every supported family is HF's cat(freqs, freqs), so the kernel reads half of cos/sin.
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        # a lean_qkv recompute (stashed attention replayed) reads no q/k values: RoPE's graph alone (`values`)
        q, k = ops["rope"](q, k, cos, sin, halves_equal=True, values=not lean_qkv_active())
        # Under offloaded checkpointing with stash_attention, kept by the forward and replayed by the recompute
        # (one-kernel paths only: a dense mask would be copied to host once per layer). With a fused O projection
        # and `stash_o_proj`, the kept block ends after it (bias aside), so the recompute skips that GEMM as well.
        keep = one_kernel_path(q, attention_mask, window)
        wo = _fused_weights([self.o_proj]) if ops["lora_linear"] is not None else None
        if wo is not None and state["stash_o_proj"]:
            w = wo[0][0]
            if state.get("host_weights"):  # the kept graph must not hold this layer's device copy until backward:
                w = w._replace(base=functools.partial(base_weight, self.o_proj.base_layer))  # read at each use

            def attention_o(q, k, v, A, B):
                o = causal_attention(q, k, v, attention_mask, self.scaling, window).reshape(b, s, -1)
                return ops["lora_linear"](o, w._replace(A=A, B=B))

            return _add_bias(attention_stash.run(attention_o, q, k, v, keep=keep, params=(w.A, w.B)), wo[1][0]), None
        out = attention_stash.run(
            lambda q, k, v: causal_attention(q, k, v, attention_mask, self.scaling, window), q, k, v, keep=keep
        ).reshape(b, s, -1)
        if wo is not None:
            out = _add_bias(ops["lora_linear"](out, wo[0][0]), wo[1][0])
        else:
            out = self.o_proj(out)
        return out, None

    _set_forward(state, attn, forward)
    report.replaced.append(f"{name}: attention (lora_qkv, rope, causal_attention, lora_linear)")


def _original_later(state: dict, module: torch.nn.Module) -> Callable[[], Callable]:
    """Look the original forward up at call time (it is recorded by the `_set_forward` that follows)."""
    return lambda: _original(state, module)


def _patch_mlp(state: dict, report: PatchReport, name: str, mlp, ops) -> None:
    if getattr(mlp.config, "hidden_act", "silu") != "silu":
        report.stock[name] = f"activation {mlp.config.hidden_act!r} is not SiLU"
        return
    mods = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    why = _reasons(name, ["gate_proj", "up_proj", "down_proj"], mods)
    if why is None and ops["lora_mlp"] is None:
        why = "kernels.lora_mlp not available"
    if why is None and any(getattr(getattr(m, "base_layer", m), "bias", None) is not None for m in mods):
        why = "MLP base bias (inside the activation, cannot be added after the fused kernel)"
    if why:
        report.stock[f"{name}.fused"] = f"{why}; projections stock, swiglu fused"

    intermediate = getattr(mlp, "intermediate_size", None) or mlp.config.intermediate_size

    def run(module, x):
        mods = [module.gate_proj, module.up_proj, module.down_proj]  # per call: PEFT may wrap them after patching
        fused = _fused_weights(mods) if ops["lora_mlp"] is not None else None
        if fused is not None and all(b is None for b in fused[1]):
            return ops["lora_mlp"](x, *fused[0])
        return module.down_proj(ops["swiglu"](module.gate_proj(x), module.up_proj(x)))

    def forward(self, x):
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        chunk = chunk_tokens_for(state["mlp_chunk_tokens"], tokens, intermediate, x.element_size())
        if chunk is None:
            return run(self, x)
        params = [p for p in self.parameters() if p.requires_grad]
        with keep_mlp_outputs(None):  # split over tokens so as to keep no [tokens, intermediate] tensor
            return tiled_over_tokens(lambda rows: run(self, rows), x, chunk, params)

    _set_forward(state, mlp, forward)
    report.replaced.append(f"{name}: lora_mlp")


_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def _residual_norms(layer) -> tuple[float, float] | None:
    """The two norms' epsilons when the layer is the pre-norm block `_patch_layer` can run with fused residual adds:
    exactly attention, MLP and their two RMSNorms (each with a weight), as Llama, Mistral, Qwen2 and Qwen3 are."""
    if {name for name, _ in layer.named_children()} != _LAYER_PARTS:
        return None
    eps = (_norm_eps(layer.input_layernorm), _norm_eps(layer.post_attention_layernorm))
    return None if None in eps else eps


def _patch_layer(state: dict, report: PatchReport, name: str, layer, ops: dict) -> None:
    """The decoder layer's forward with each residual add inside a norm kernel, for calls from the patched layer
    loop (`kernels.rms_norm.add_rms_norm`, `rms_norm_residual`; a recompute's last add keeps no values,
    `models.checkpointing.residual_add`). Other calls (generation with a cache, HF's own loop), norms ZeRO-3 has
    partitioned and `fused_residuals` off run the layer's own forward."""
    norms = _residual_norms(layer)
    add_norm, norm_residual = ops["add_rms_norm"], ops["rms_norm_residual"]
    if add_norm is None or norm_residual is None:
        report.stock[f"{name}.residuals"] = "kernels.rms_norm.add_rms_norm not available: residual adds stay separate"
        return
    if norms is None:
        report.stock[f"{name}.residuals"] = "not attention, MLP and two RMSNorms: residual adds stay separate"
        return
    original = _original_later(state, layer)

    def forward(self, hidden_states, *args, **kwargs):
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        mask = kwargs.get("attention_mask")
        ours = not args and set(kwargs) <= {"attention_mask", "position_ids", "position_embeddings"}
        # ZeRO-3 gathers a partitioned norm weight only when the norm module itself is called.
        partitioned = zero3_partitioned(n1.weight) or zero3_partitioned(n2.weight)
        if not (state["fused_residuals"] and ours and isinstance(mask, AttnMeta)) or partitioned:
            return original()(hidden_states, *args, **kwargs)
        residual, x = norm_residual(hidden_states, n1.weight, norms[0])
        x, _ = self.self_attn(hidden_states=x, **kwargs)
        residual, x = add_norm(residual, x, n2.weight, norms[1])
        return residual_add(residual, self.mlp(x))

    _set_forward(state, layer, forward)
    report.replaced.append(f"{name}: residual adds inside the norms (add_rms_norm, rms_norm_residual)")


def _layer_fn(layer, meta: AttnMeta, position_embeddings, position_ids) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, attention_mask=meta, position_ids=position_ids, position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    return run


def _stock_call(kwargs: dict) -> bool:
    """Calls the fused path does not serve: generation with a cache, per-layer outputs, 4D masks."""
    mask = kwargs.get("attention_mask")
    return bool(
        kwargs.get("past_key_values") is not None
        or kwargs.get("use_cache")
        or kwargs.get("output_attentions")
        or kwargs.get("output_hidden_states")
        or (mask is not None and mask.dim() != 2)
    )


def _patch_embedding(state: dict, report: PatchReport, embed: torch.nn.Module) -> None:
    """The input embedding gathers from a pinned host table when `settings.set_embeddings_on_host` put it there."""
    if type(embed) is not torch.nn.Embedding or embed.max_norm is not None:
        report.stock["model.embed_tokens"] = f"{type(embed).__name__} (host gather takes a plain nn.Embedding)"
        return
    original = _original_later(state, embed)
    gather = _op("embedding", "embedding")

    def forward(self, input_ids):
        if self.weight.is_cuda or not input_ids.is_cuda:
            return original()(input_ids)
        return gather(input_ids, self.weight)

    _set_forward(state, embed, forward)
    report.replaced.append("model.embed_tokens: embedding (reads a host table when it is on the host)")


def _patch_inner(state: dict, report: PatchReport, inner) -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    original = _original_later(state, inner)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if _stock_call({**kwargs, "attention_mask": attention_mask}):
            return original()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = hidden.shape[:2]
        # Recorded into a CUDA graph: nothing read on the host; packed rows get models.graphs' capacity (static_docs).
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        static_docs = state["capture_docs"] if capturing else None
        if capturing and position_ids is not None and static_docs is None:
            raise RuntimeError("packed rows recorded into a CUDA graph need a document capacity (CapturedStep sets it)")
        meta = build_attn_meta(position_ids, attention_mask, b, s, hidden.device, static_docs)
        meta.static_longest = state["capture_longest"] if static_docs is not None else None
        if position_ids is None:
            position_ids = torch.arange(s, device=hidden.device)[None]
        cos, sin = self.rotary_emb(hidden, position_ids=position_ids)
        position_embeddings = (cos.expand(b, -1, -1), sin.expand(b, -1, -1))
        mode = state["gradient_checkpointing"]
        checkpointing = mode != "off" and self.training and torch.is_grad_enabled()
        n_ckpt = state["checkpoint_layers"]
        n_run = self.config.num_hidden_layers
        # The last `keep_mlp_layers` checkpointed layers keep their MLP's gate and up outputs (settings).
        keep_from = min(n_run, n_ckpt if n_ckpt is not None else n_run) - state["keep_mlp_layers"]
        offload = mode == "offload"
        chain = OffloadChain() if checkpointing and offload else None
        # The last layers (settings: true is one) keep their inputs and stashes on the device when the last layer is
        # checkpointed; not layer 0, whose input may be the caller's own tensor (kept as it is, not a copy, it must
        # not change before backward).
        n_dev = min(int(state["last_layer_on_device"]), n_run - 1) if n_ckpt is None or n_ckpt >= n_run else 0
        # More layers keep those outputs in host memory, spread over the rest (settings; offload only); never the
        # last layer, whose copies would come straight back (`prefetch_last`) beside the forward's own, nor one
        # that keeps its stash on the device.
        below = min(keep_from, n_run - max(n_dev, 1))
        on_host = host_kept_layers(below, state["keep_mlp_layers_on_host"]) if offload else set()
        gate = (
            host_gate_layers(below, state["keep_mlp_layers_on_host"], state["keep_mlp_gate_on_host"]) if offload else ()
        )
        after = state["after_layer_backward"]
        # settings.set_weights_on_host: each layer's brought in as it runs (all of them already are while borrowed)
        hw = None if state.get("borrowed") else state.get("host_weights")
        for i, layer in enumerate(self.layers[:n_run]):
            run = _layer_fn(layer, meta, position_embeddings, position_ids)
            stream_layers(hw, i)
            ckpt = checkpointing and (n_ckpt is None or i < n_ckpt)
            if ckpt:
                hidden = checkpoint_layer(
                    run,
                    hidden,
                    offload=offload,
                    dequant_once=state["dequantize_once"],
                    lean=state["lean_recompute"],
                    chain=chain,
                    stash=state["stash_attention"],
                    lean_qkv=not state["qk_norm"],
                    after_backward=None if after is None else functools.partial(after, i),
                    keep_mlp=i >= keep_from or i in on_host or i in gate,
                    keep_on_host=i in on_host or i in gate,
                    keep_gate_only=i in gate,
                    offload_lag=state["offload_lag"],
                    on_device=i >= n_run - n_dev,
                    weights=(hw[i], hw[i - 1] if i else None) if hw else None,
                )
            else:
                hidden = run(hidden)
            # A checkpointed layer brings its weights back for its backward (not the last: its backward comes next);
            # one that is not keeps them while anything may still read them (its ops' backward, a tiled MLP's rerun)
            if hw and (not torch.is_grad_enabled() or (ckpt and i < n_run - 1)):
                hw[i].unbind()
        if chain is not None and (n_ckpt is None or n_ckpt >= n_run):
            # Only when the last layer is checkpointed: otherwise the copies would sit on the GPU through the
            # backward of the layers that kept their activations.
            chain.prefetch_last()
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    _set_forward(state, inner, forward)
    report.replaced.append("model: layer loop (attention metadata once, per-layer gradient checkpointing)")


def _patch_lm(state: dict, report: PatchReport, lm, ops) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def loss_stock_reason(head) -> str | None:
        # Checked per call as well: PEFT may freeze the head (or wrap it) after patching.
        if ops["fused_linear_cross_entropy"] is None:
            return "kernels.fused_linear_cross_entropy not available"
        return head_loss_reason(head)

    why = loss_stock_reason(lm.get_output_embeddings())
    if why is not None:
        report.stock["lm_head.loss"] = why
    original = _original_later(state, lm)

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None, **kwargs
    ):
        stock_loss = labels is not None and loss_stock_reason(self.get_output_embeddings()) is not None
        if _stock_call({**kwargs, "attention_mask": attention_mask}) or stock_loss:
            with weights_on_device(self):  # the stock forward reads embedding and head on the device
                return original()(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    inputs_embeds=inputs_embeds,
                    labels=labels,
                    **kwargs,
                )
        num_items = kwargs.get("num_items_in_batch")
        logits_to_keep = kwargs.get("logits_to_keep", 0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        hidden = out.last_hidden_state
        loss = logits = None
        if labels is not None:
            # HF's ForCausalLMLoss shift: pad one ignored label at the end, drop the first.
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
            flat_h = hidden.reshape(-1, hidden.shape[-1])
            weight = self.get_output_embeddings().weight
            stream = ops["streamed_linear_cross_entropy"]
            if (state["head_on_host"] or weight.device != flat_h.device) and stream is not None:
                # settings.set_head_on_host: the head comes over chunk by chunk
                loss = stream(flat_h, weight, shifted.reshape(-1))
            else:
                loss = ops["fused_linear_cross_entropy"](flat_h, weight, shifted.reshape(-1))
            if num_items is not None:
                count = (shifted != -100).sum()
                loss = loss * count / torch.as_tensor(num_items, device=loss.device)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            with weights_on_device(self, keys=("head",)):
                logits = self.get_output_embeddings()(hidden[:, keep, :])
        result = CausalLMOutputWithPast(loss=loss, logits=logits)
        return result.to_tuple() if kwargs.get("return_dict") is False else result

    _set_forward(state, lm, forward)
    report.replaced.append("lm_head: fused_linear_cross_entropy (per call, when the head allows)")


def patch(
    model: torch.nn.Module, gradient_checkpointing: str | None = None, mlp_chunk_tokens: int | str | None = "auto"
) -> PatchReport:
    """Swap the fused kernels into a causal LM of the Llama, Mistral, Qwen2 or Qwen3 family.

    Args:
        model: a transformers causal LM or a PEFT model wrapping one (LoRA attached or not; bnb NF4 or dense).
        gradient_checkpointing: "off", "on" or "offload"; None keeps HF's setting ("on" if the model has
            gradient checkpointing enabled). HF's own checkpointing is switched off either way: the patched
            layer loop checkpoints each layer itself.
        mlp_chunk_tokens: split each MLP call over its tokens, keeping no `[tokens, intermediate]` tensor
            between forward and backward (models.tiling): a positive int = tokens per chunk, 0 or None =
            never, "auto" (default) = only when one such intermediate would exceed 1 GiB (long sequences;
            shorter ones run exactly as without tiling). Change it later with `models.settings.set_mlp_chunk_tokens`.

    Returns:
        A PatchReport. Patching an already patched model returns its existing report.

    Raises:
        ValueError: a bad gradient_checkpointing mode or mlp_chunk_tokens.
    """
    lm = causal_lm(model)
    if STATE_ATTR in lm.__dict__:
        return lm.__dict__[STATE_ATTR]["report"]
    if gradient_checkpointing is None:
        gradient_checkpointing = "on" if getattr(lm, "is_gradient_checkpointing", False) else "off"
    check_mode(gradient_checkpointing)
    check_chunk_tokens(mlp_chunk_tokens)
    family = family_of(lm)
    inner = getattr(lm, "model", None)
    if family is None or not all(hasattr(inner, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")):
        model_type = getattr(lm.config, "model_type", type(lm).__name__)
        warnings.warn(
            f"raytune_llm: architecture {model_type!r} is not one of llama/mistral/qwen2/qwen3; "
            "training on stock transformers modules (no fused kernels)",
            stacklevel=2,
        )
        return PatchReport(family=None, stock={"model": f"unsupported architecture {model_type!r}"})

    ops = {
        "rms_norm": _op("rms_norm", "rms_norm"),
        "add_rms_norm": _op("rms_norm", "add_rms_norm"),
        "rms_norm_residual": _op("rms_norm", "rms_norm_residual"),
        "rope": _op("rope", "rope"),
        "swiglu": _op("swiglu", "swiglu"),
        "fused_linear_cross_entropy": _op("cross_entropy", "fused_linear_cross_entropy"),
        "streamed_linear_cross_entropy": _op("cross_entropy_streamed", "streamed_linear_cross_entropy"),
        "lora_qkv": _op("lora", "lora_qkv"),
        "lora_linear": _op("lora", "lora_linear"),
        "lora_mlp": _op("lora", "lora_mlp"),
    }
    hf_checkpointing = bool(getattr(lm, "is_gradient_checkpointing", False))
    if hf_checkpointing:
        lm.gradient_checkpointing_disable()  # the patched layer loop checkpoints; never both
    state: dict[str, Any] = {
        "originals": [],
        "hf_checkpointing": hf_checkpointing,
        "mlp_chunk_tokens": mlp_chunk_tokens,
        "checkpoint_layers": None,
        "dequantize_once": False,
        "lean_recompute": True,
        "stash_attention": False,
        "stash_o_proj": True,
        "qk_norm": family.qk_norm,
        "capture_docs": None,
        "capture_longest": None,
        "keep_mlp_layers": 0,
        "keep_mlp_layers_on_host": 0,
        "keep_mlp_gate_on_host": 0,
        "offload_lag": 2,
        "fused_residuals": True,
        "last_layer_on_device": False,
        "embed_home": None,
        "head_home": None,
        "head_on_host": False,
        "host_weights": None,
        "gradient_checkpointing": gradient_checkpointing,
        "after_layer_backward": None,
    }
    report = PatchReport(
        family=family.name,
        gradient_checkpointing=gradient_checkpointing,
        mlp_chunk_tokens=mlp_chunk_tokens,
        fused_residuals=True,
    )
    fuse_attention = not getattr(lm.config, "attention_dropout", 0.0)
    for i, layer in enumerate(inner.layers):
        prefix = f"model.layers.{i}"
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            _patch_norm(state, report, f"{prefix}.{norm_name}", getattr(layer, norm_name), ops["rms_norm"])
        if family.qk_norm:
            _patch_norm(state, report, f"{prefix}.self_attn.q_norm", layer.self_attn.q_norm, ops["rms_norm"])
            _patch_norm(state, report, f"{prefix}.self_attn.k_norm", layer.self_attn.k_norm, ops["rms_norm"])
        if fuse_attention:
            _patch_attention(state, report, f"{prefix}.self_attn", layer.self_attn, family, i, ops)
        _patch_mlp(state, report, f"{prefix}.mlp", layer.mlp, ops)
        if fuse_attention:  # only the patched layer loop's calls take the fused block
            _patch_layer(state, report, prefix, layer, ops)
    _patch_norm(state, report, "model.norm", inner.norm, ops["rms_norm"])
    _patch_embedding(state, report, inner.embed_tokens)
    if fuse_attention:
        _patch_inner(state, report, inner)
    else:
        report.stock["model"] = "attention_dropout > 0: stock attention and HF's layer loop"
    _patch_lm(state, report, lm, ops)
    state["report"] = report
    lm.__dict__[STATE_ATTR] = state
    return report


def unpatch(model: torch.nn.Module) -> None:
    """Restore every forward `patch` replaced (a no-op on an unpatched model).

    Args:
        model: the model given to `patch` (PEFT wrapper or causal LM).
    """
    lm = causal_lm(model)
    state = lm.__dict__.get(STATE_ATTR)
    if state is None:
        return
    bring_home(lm, state)  # the stock embedding and head read on the device
    del lm.__dict__[STATE_ATTR]
    if getattr(lm.__dict__.get("generate"), "_raytune_host_embedding", False):
        del lm.__dict__["generate"]  # settings' wrapper for the host embedding
    for module, own in reversed(state["originals"]):
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own
    if state["hf_checkpointing"]:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
