"""Causal attention for packed and unpacked batches: one entry point over a fast path and fallbacks.

A packed row holds several examples whose `position_ids` restart at 0; document ids are
`cumsum(position_ids == 0)` and a query may only see keys of its own document. `AttnMeta` is built
once per model forward (one host sync to learn whether any row is packed) and shared by every layer.

Paths, first that applies:

1. Unpacked, no padding mask, no active window: SDPA `is_causal=True` (flash backend on CUDA).
2. CUDA, packed, bf16/fp16, no padding mask: `torch.nn.attention.varlen.varlen_attn` (flash varlen;
   causal is `window_size=(-1, 0)`), else SDPA looped per document. On the H200 (session 26,
   bench/gpu/probe_packed_attention.py, 8,192 tokens) its forward + backward took 0.68-1.72 ms a layer at 32 to
   6 documents, against 1.34-2.19 ms for compiled FlexAttention with a document-causal block mask (plus 4-7 ms
   to build the mask) and 3.8-14.3 ms for the per-document loop, so FlexAttention is not wired in. The kv heads
   go in unrepeated: FlashAttention's varlen kernels read a kv head for each group of query heads and sum dk, dv
   over the group themselves, so a repeated copy would only cost its writes, the kernel's 4x larger kv reads
   (Llama's 32 q / 8 kv) and, under `models.attention_stash`, 4x the kv bytes copied to host memory and back for
   every layer (1.87 against 1.72 ms at 6 documents). A torch that would send varlen to its cuDNN backend (no
   causal window, no GQA) gets the per-document loop: cuDNN's ragged layout, called directly, gave wrong dq and
   dk and took 130-170 ms forward + backward on the H200 (session 26).
3. Everything else (the CPU lane, padding masks, sliding windows): SDPA with a dense boolean mask
   `causal & same_document & inside_window & key_is_real`. Each query also sees itself so a fully
   padded row gives finite (ignored) outputs instead of NaN.

Tensors follow HF's attention layout: q `[B, Hq, S, D]`, k/v `[B, Hk, S, D]`; the result is
`[B, S, Hq, D]` like HF's attention interfaces return.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# varlen_attn runs FlashAttention, which takes half precision only.
_FLASH_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class AttnMeta:
    """Per-forward attention metadata shared by all layers.

    Attributes:
        doc_ids: `[B, S]` int document index of each token (0-based per row).
        packed: some row holds more than one document.
        key_mask: `[B, S]` bool, False at padding keys (from a user 2D attention_mask), or None.
        cache: per-window dense masks built lazily and reused by every layer of the forward.
        static_docs: set for a forward recorded into a CUDA graph (`models.graphs`): nothing is read on the host;
            rows count as packed and `cu_seqlens` has this many documents (the real ones, then empty ones),
            with the row length as the longest (or static_longest). The caller guarantees no batch holds more
            documents.
        static_longest: with static_docs, the longest document the recorded batches may hold (`models.graphs`
            falls back to an eager step for a longer one): what varlen attention is told instead of the row
            length, so its grid (documents x blocks of the longest x heads) holds fewer blocks that only exit.
    """

    doc_ids: torch.Tensor
    packed: bool
    key_mask: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)
    static_docs: int | None = None
    static_longest: int | None = None


def build_attn_meta(
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    batch: int,
    seq_len: int,
    device,
    static_docs: int | None = None,
) -> AttnMeta:
    """Derive document ids (and a padding mask) once per forward.

    Args:
        position_ids: `[B, S]` or `[1, S]` positions; restarts at 0 mark new documents; None = one document.
        attention_mask: HF 2D `[B, S]` mask (1 = real token) or None; an all-ones mask is dropped.
        batch: B.
        seq_len: S.
        device: where the tensors live.
        static_docs: with position_ids, read nothing on the host (a CUDA graph capture): the rows count as
            packed and `cu_seqlens` holds this many documents (see AttnMeta). Not with an attention_mask.

    Returns:
        An AttnMeta.

    Raises:
        ValueError: a mask or position_ids that is not 2D `[B, S]`, or static_docs with an attention mask.
    """
    if position_ids is None:
        doc_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        packed = False
    else:
        if position_ids.dim() != 2 or position_ids.shape[-1] != seq_len:
            raise ValueError(
                f"position_ids must be [batch, seq_len]=[{batch}, {seq_len}], got {tuple(position_ids.shape)}"
            )
        starts = position_ids == 0
        # The first token opens document 0 whatever its position (a row may continue an earlier one).
        doc_ids = starts.long().cumsum(-1) - starts[:, :1].long()
        doc_ids = doc_ids.expand(batch, seq_len)
        packed = True if static_docs is not None else bool(starts[:, 1:].any())
    if static_docs is not None and attention_mask is not None:
        raise ValueError("a forward recorded into a CUDA graph takes no attention_mask (only position_ids)")
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"the fused path takes a 2D [batch, seq_len] attention_mask, got {attention_mask.dim()}D")
        key_mask = attention_mask.to(device=device, dtype=torch.bool)
        if bool(key_mask.all()):
            key_mask = None
    return AttnMeta(
        doc_ids=doc_ids,
        packed=packed,
        key_mask=key_mask,
        static_docs=static_docs if position_ids is not None else None,
    )


def dense_mask(meta: AttnMeta, window: int | None) -> torch.Tensor:
    """Boolean `[B, 1, S, S]` mask, True where a query may attend (cached on `meta` per window).

    Args:
        meta: the forward's AttnMeta.
        window: keys a query sees, itself included; None = unbounded.

    Returns:
        `causal & same_document & inside_window & key_is_real`, with the diagonal always allowed.
    """
    if window in meta.cache:
        return meta.cache[window]
    doc = meta.doc_ids
    s = doc.shape[-1]
    idx = torch.arange(s, device=doc.device)
    allowed = (idx[None, :] <= idx[:, None])[None] & (doc[:, :, None] == doc[:, None, :])
    if window is not None:
        allowed = allowed & (idx[:, None] - idx[None, :] < window)[None]
    if meta.key_mask is not None:
        allowed = allowed & meta.key_mask[:, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool, device=doc.device)[None]
    mask = allowed[:, None]
    meta.cache[window] = mask
    return mask


def _varlen(device: torch.device) -> tuple[Callable, tuple[tuple[str, bool], ...]] | None:
    """torch's flash `varlen_attn` for this device and the keyword arguments that hand it kv heads shared by groups
    of query heads (``enable_gqa`` where this torch has it: torch >= 2.12 refuses unequal head counts without it;
    none before, where the flash kernel takes them as they are), or None: no `torch.nn.attention.varlen`, or a torch
    that would send varlen to its cuDNN backend (`_should_use_cudnn`; some versions on compute capability 10 and up),
    which refuses both a causal window and GQA (torch 2.13): packed rows then go per document."""
    try:
        import torch.nn.attention.varlen as varlen
    except ImportError:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    cudnn = getattr(varlen, "_should_use_cudnn", None)
    if cudnn is not None and cudnn(index):
        return None
    return varlen.varlen_attn, _gqa_keywords(varlen.varlen_attn)


@functools.cache
def _gqa_keywords(varlen_attn: Callable) -> tuple[tuple[str, bool], ...]:
    return (("enable_gqa", True),) if "enable_gqa" in inspect.signature(varlen_attn).parameters else ()


def cu_seqlens(meta: AttnMeta) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch (int32, `[n_docs + 1]`) and the longest.

    Args:
        meta: AttnMeta with the document ids.

    Returns:
        `(cu_seqlens, max_len)` as varlen attention takes them. With `meta.static_docs` (no host reads):
        `static_docs + 1` entries, the documents past the real ones empty (their bounds equal the token count),
        and `meta.static_longest` (else the row length) as the longest.
    """
    if "cu" not in meta.cache and meta.static_docs is not None:
        b, s = meta.doc_ids.shape
        starts = torch.ones_like(meta.doc_ids, dtype=torch.bool)  # every row opens a document
        starts[:, 1:] = meta.doc_ids[:, 1:] != meta.doc_ids[:, :-1]
        first = torch.nonzero_static(starts.reshape(-1), size=meta.static_docs, fill_value=b * s).flatten()
        cu = torch.cat([first, first.new_full((1,), b * s)]).to(torch.int32)
        meta.cache["cu"] = (cu, min(s, meta.static_longest or s))
    if "cu" not in meta.cache:
        b, s = meta.doc_ids.shape
        # Global document index over the flattened batch; row r's docs are offset past row r-1's.
        per_row = meta.doc_ids[:, -1] + 1
        offsets = torch.cumsum(per_row, 0) - per_row
        flat = (meta.doc_ids + offsets[:, None]).reshape(-1)
        lengths = torch.bincount(flat)
        cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        meta.cache["cu"] = (cu, int(lengths.max()))
    return meta.cache["cu"]


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def per_document_attention(q, k, v, meta: AttnMeta, scaling: float) -> torch.Tensor:
    """Causal SDPA run separately on each document of each row (the CUDA fallback without varlen).

    Args:
        q, k, v: `[B, H, S, D]` (kv heads already repeated).
        meta: AttnMeta with the document ids.
        scaling: softmax scale.

    Returns:
        `[B, H, S, D]`.
    """
    out = torch.empty_like(q)
    doc = meta.doc_ids.cpu()
    for row in range(q.shape[0]):
        bounds = torch.nonzero(torch.diff(doc[row], prepend=doc[row, :1] - 1)).flatten().tolist() + [q.shape[2]]
        for a, b in zip(bounds[:-1], bounds[1:]):
            out[row : row + 1, :, a:b] = F.scaled_dot_product_attention(
                q[row : row + 1, :, a:b],
                k[row : row + 1, :, a:b],
                v[row : row + 1, :, a:b],
                is_causal=True,
                scale=scaling,
            )
    return out


def one_kernel_path(q: torch.Tensor, meta: AttnMeta, window: int | None = None) -> bool:
    """Whether `causal_attention` runs these inputs as one fused attention kernel (flash varlen for packed rows on
    CUDA, SDPA `is_causal` otherwise), not through a dense [B, 1, S, S] mask or a per-document loop.

    models.attention_stash keeps what attention's backward saves only on these paths: a dense mask would be
    copied to host memory once per layer (S^2 per row).
    """
    if window is not None and q.shape[2] <= window:
        window = None
    if meta.key_mask is not None or window is not None:
        return False
    if not meta.packed:
        return True
    if not (q.is_cuda and q.dtype in _FLASH_DTYPES):
        return False
    return _varlen(q.device) is not None


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scaling: float, window: int | None = None
) -> torch.Tensor:
    """Causal (document-masked, optionally windowed) attention.

    Args:
        q: `[B, Hq, S, D]` queries (RoPE applied).
        k: `[B, Hk, S, D]` keys, Hq divisible by Hk (GQA).
        v: `[B, Hk, S, D]` values.
        meta: AttnMeta of this forward.
        scaling: softmax scale (HF's `module.scaling`, usually D**-0.5).
        window: sliding window (keys seen, itself included) or None.

    Returns:
        `[B, S, Hq, D]` attention output.
    """
    b, hq, s, d = q.shape
    n_rep = hq // k.shape[1]
    if window is not None and s <= window:
        window = None  # a window longer than the row changes nothing
    if q.is_cuda and meta.packed and meta.key_mask is None and window is None and q.dtype in _FLASH_DTYPES:
        found = _varlen(q.device)
        if found is not None:
            varlen_attn, gqa = found
            cu, max_len = cu_seqlens(meta)
            # [T, H, D] each (views: q, k and v come in the [B, S, H, D] layout); k and v keep their Hk heads, the
            # kernel does GQA itself (see the module docstring)
            flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v)]
            extra = dict(gqa) if n_rep > 1 else {}
            out = varlen_attn(*flat, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), **extra)
            return out.reshape(b, s, hq, d)
    if not meta.packed and meta.key_mask is None and window is None:
        # enable_gqa: the flash backend reads the shared kv heads, no repeated copy (as HF does on torch >= 2.5).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=n_rep > 1)
        return out.transpose(1, 2)
    k = _repeat_kv(k, n_rep)
    v = _repeat_kv(v, n_rep)
    if q.is_cuda and meta.key_mask is None and window is None:
        if meta.static_docs is not None:  # the loop reads the document bounds on the host
            raise RuntimeError(
                "packed rows recorded into a CUDA graph need flash varlen, which this torch does not have "
                "(run them eagerly: train.cuda_graph false)"
            )
        return per_document_attention(q, k, v, meta, scaling).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(meta, window), scale=scaling)
    return out.transpose(1, 2)
