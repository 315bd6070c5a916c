"""The adapters' ``X A^T`` from a checkpointed layer's forward, kept for its recompute.

Every LoRA projection forms ``X A^T`` (``[N, r]``; one product per input, for all the projections that read it:
Q/K/V's ``[N, 3r]``, gate/up's ``[N, 2r]``) by reading ``X`` whole: at 65,536 tokens of Llama-3.1-8B that is a
0.54 GB read for a 6 MiB result, ~0.2 ms on the H200. A checkpointed layer's recompute forms them again from the
same ``X`` (the recompute runs the forward's kernels on the forward's input: the same bits), so the forward keeps
them (`keep_thin_products`, inside the layer's no-grad forward) and the recompute takes them back
(`reuse_thin_products`) instead: ~0.4 ms a layer less at 65,536 tokens, for ``N x 5r`` elements held from the
layer's forward to its backward (10 MiB a layer there at r = 16, 1.3 MiB at 4x2048).

Entries are keyed by the first adapter tensor's identity (a PEFT parameter: the same object in the forward and the
recompute) and kept in call order per key (an MLP split over its tokens makes one per piece). A product inside a
recorded attention stash (an O projection the recompute replays rather than runs: `models.attention_stash`) is not
kept; a key the recompute does not find is formed as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["keep_thin_products", "reuse_thin_products", "thin_product"]

# Open blocks, innermost last; module-level because a recompute runs on autograd's device thread.
_keep: list[dict] = []
_reuse: list[dict] = []


@contextlib.contextmanager
def keep_thin_products(store: dict | None) -> Iterator[None]:
    """Inside this block `thin_product` adds its result to ``store`` (None: keeps nothing, inside an outer block:
    a recorded attention stash, which the recompute replays without forming its products again)."""
    _keep.append(store)
    try:
        yield
    finally:
        _keep.pop()


@contextlib.contextmanager
def reuse_thin_products(store: dict | None) -> Iterator[None]:
    """Inside this block `thin_product` takes its result from ``store`` (what `keep_thin_products` filled in the
    same layer's forward), in call order per key, when there is one (None: a store already used up and dropped, as
    in a second backward through a retained graph: every product is formed again)."""
    _reuse.append(store)
    try:
        yield
    finally:
        _reuse.pop()


def thin_product(X: torch.Tensor, A: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``X @ A.T`` (``[N, r]``), or the forward's own result inside `reuse_thin_products`.

    Args:
        X: ``[N, in]`` rows.
        A: ``[r, in]`` adapters (cast to X's dtype, concatenated for the projections that read X).
        key: the first adapter as the caller received it (its identity names the call).

    Raises:
        RuntimeError: a kept result that does not fit this call (the recompute ran other inputs).
    """
    if _reuse and _reuse[-1] is not None:
        key_kept = _reuse[-1].get(id(key))
        if key_kept is not None and key_kept[0] is key and key_kept[1]:  # the very tensor, not one at its old id
            XA = key_kept[1].pop(0)
            if XA.shape != (X.shape[0], A.shape[0]) or XA.dtype != X.dtype or XA.device != X.device:
                raise RuntimeError(
                    f"thin_product: kept X A^T {tuple(XA.shape)} {XA.dtype} does not match this call "
                    f"({X.shape[0]} rows, rank {A.shape[0]}, {X.dtype}): the recompute ran other inputs"
                )
            return XA
    XA = X @ A.t()
    if _keep and _keep[-1] is not None:
        _keep[-1].setdefault(id(key), (key, []))[1].append(XA)  # the key itself is held: its id stays its own
    return XA
