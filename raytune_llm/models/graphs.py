"""A training step captured once as a CUDA graph and replayed: no Python, no launches, per step.

At batch 1 x 2,048 tokens an 8B QLoRA step of the patched model is host-bound: the GPU finishes a
layer's kernels faster than Python issues them (bench/NOTES.md: the same step ran 4,875 and 7,240
tokens/s on two machines whose GPUs are the same). `CapturedStep` records forward, backward and,
when given an optimizer, gradient clipping, the optimizer step and the zeroing of the gradients,
once for a fixed batch shape, and replays the recording on every later call: the host then does one
copy per batch tensor and one graph launch per step.

What a captured step needs, checked where it can be:

- Every call passes the same keys, shapes and dtypes (fixed-length rows, as the packer writes them).
  A different signature raises; it is not silently re-captured.
- The forward never reads a device value on the host. The patched model does not for rows without
  `position_ids` (one document per row). For packed rows (position ids restarting per example) it is
  told a document capacity before the capture: flash varlen then gets that many document bounds (the
  real ones, then empty ones, found on the GPU by `nonzero_static`) and the row length as the longest
  (`models.attention.cu_seqlens`). The capacity is twice the most documents a warm-up batch held, rounded
  up to a power of two (at least 8); the longest document varlen attention is told likewise twice the longest
  a warm-up batch held, a power of two, at most the row length (its grid is documents x blocks of the longest
  x heads, and every block past a document's end only exits). `position_ids` must then come on the CPU: each
  call counts the batch's documents and measures its longest there, and a batch over either bound runs as an
  eager step instead (counted in `eager_steps`), never as a wrong replay.
- Gradients live in fixed buffers, allocated before the first step and zeroed in place by the step
  (with an optimizer) or by `zero_grad` (without one). A caller's `zero_grad(set_to_none=True)` would
  detach them from the recording; the next call raises instead of training on stale buffers.
- An optimizer inside the graph must be capturable: torch's Adam / AdamW (and the others with a
  `capturable` option) are switched to it, their step counters moved to the device, and each float
  learning rate becomes a device tensor, so an LR scheduler's updates (written in place) still reach
  the recording.
- No dropout: a checkpointed layer's recompute restores the RNG state, which cannot happen inside a
  capture. (The fused LoRA kernels take dropout 0 only anyway.)

The first `warmup` calls run eagerly on a side stream (cuBLAS workspaces, Triton compiles and the
caching allocator settle there), each a real training step. The next call captures and then replays
its own batch, so no step is run twice or skipped. Without CUDA (the CPU lane) every call runs the same
step eagerly, so a training loop is written once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepOutput(NamedTuple):
    """What a step returns. With a graph these are the recording's own tensors: read them (``float()``)
    before the next call, which overwrites them."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None


def _signature(batch: dict) -> tuple:
    sig = []
    for key in sorted(batch):
        value = batch[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"CapturedStep takes tensors only; {key!r} is {type(value).__name__}")
        sig.append((key, tuple(value.shape), value.dtype))
    return tuple(sig)


def _check_no_dropout(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        p = (
            module.p
            if isinstance(module, torch.nn.Dropout)
            else getattr(getattr(module, "config", None), "attention_dropout", 0)
        )
        if isinstance(p, (int, float)) and p > 0 and module.training:
            raise ValueError(
                f"CapturedStep: {name or 'the model'} has dropout {p} > 0; a captured step cannot restore "
                "the RNG state a checkpointed layer's recompute needs (use dropout 0)"
            )


def documents(position_ids: torch.Tensor) -> int:
    """Documents in packed rows `[rows, S]`: each row's first token opens one, every later position 0 another."""
    return position_ids.shape[0] + int((position_ids[:, 1:] == 0).sum())


def longest_document(position_ids: torch.Tensor) -> int:
    """Tokens in the longest document of packed rows `[rows, S]` (documents as `documents` counts them)."""
    rows, s = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True  # a row's first token opens a document, so a row's end closes one
    bounds = torch.cat([torch.arange(rows * s)[starts.reshape(-1)], torch.tensor([rows * s])])
    return int(torch.diff(bounds).max())


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Switch a torch optimizer to its capturable form in place: ``capturable=True``, step counters on the device,
    float learning rates as 0-d device tensors (schedulers write them in place).

    Raises:
        ValueError: an optimizer without a ``capturable`` option (it cannot step inside a CUDA graph).
    """
    if optimizer.defaults.get("fused"):
        return
    if "capturable" not in optimizer.defaults:
        raise ValueError(
            f"{type(optimizer).__name__} has no capturable form; pass optimizer=None and step it outside the graph"
        )
    for group in optimizer.param_groups:
        group["capturable"] = True
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device != device:
            state["step"] = step.to(device=device, dtype=torch.float32)


class CapturedStep:
    """Forward + backward (+ clip, optimizer step, zeroing) of a fixed-shape batch, as a CUDA graph.

    Args:
        model: the trainable model (`model(**batch).loss` is the loss).
        optimizer: stepped (and the gradients zeroed) inside the step; None = the caller steps it and zeroes
            the gradients with `zero_grad` (gradient accumulation over several calls).
        max_grad_norm: with an optimizer, clip the gradients' total norm to this before stepping (None: no clip).
        loss_scale: multiply the loss by this before backward (``1 / grad_accum``); the returned loss is unscaled.
        warmup: eager steps before the capture (at least 1).
        graph: capture and replay (default: when the model's trainable parameters are on a CUDA device).

    Raises:
        ValueError: no trainable parameters, a graph without CUDA, dropout > 0, or an optimizer that cannot be
            captured.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        max_grad_norm: float | None = None,
        loss_scale: float = 1.0,
        warmup: int = 2,
        graph: bool | None = None,
    ) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("CapturedStep: the model has no trainable parameters")
        if warmup < 1:
            raise ValueError(f"CapturedStep: warmup must be >= 1 (an eager step before the capture), got {warmup}")
        if max_grad_norm is not None and optimizer is None:
            raise ValueError("CapturedStep: max_grad_norm clips before the optimizer step; it needs the optimizer")
        self.device = self.params[0].device
        self.graphed = self.device.type == "cuda" if graph is None else graph
        if self.graphed and self.device.type != "cuda":
            raise ValueError(f"CapturedStep: a CUDA graph needs the model on a CUDA device; it is on {self.device}")
        _check_no_dropout(model)
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.loss_scale = loss_scale
        self.warmup = warmup
        if self.graphed and optimizer is not None:
            make_capturable(optimizer, self.device)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        self.calls = 0
        self.eager_steps = 0
        self.doc_capacity: int | None = None
        self.doc_longest: int | None = None
        self._docs_seen = 0
        self._longest_seen = 0
        self._signature: tuple | None = None
        self._stream = torch.cuda.Stream(self.device) if self.graphed else None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._out: StepOutput | None = None

    @property
    def captured(self) -> bool:
        """Whether the step has been recorded (calls from now on replay it)."""
        return self._graph is not None

    def zero_grad(self) -> None:
        """Zero the gradient buffers in place (without an optimizer in the step: after the caller's step)."""
        torch._foreach_zero_(self.grads)

    def _check(self, batch: dict) -> None:
        sig = _signature(batch)
        if self._signature is None:
            self._signature = sig
        elif sig != self._signature:
            raise ValueError(
                f"CapturedStep: batch {list(sig)} differs from the captured {list(self._signature)}; "
                "a captured step takes one fixed shape"
            )
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                raise RuntimeError(
                    "CapturedStep: a parameter's gradient buffer was replaced or set to None "
                    "(zero_grad(set_to_none=True)?); zero them with CapturedStep.zero_grad or set_to_none=False"
                )

    def _body(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        loss = self.model(**batch).loss
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        grad_norm = None
        if self.optimizer is not None:
            if self.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            self.optimizer.step()
            torch._foreach_zero_(self.grads)
        return StepOutput(loss.detach(), grad_norm)

    def __call__(self, **batch: torch.Tensor) -> StepOutput:
        """Run one step on ``batch`` (keyword tensors of the model's forward, e.g. input_ids and labels)."""
        self._check(batch)
        self.calls += 1
        if not self.graphed:
            return self._body({k: v.to(self.device) for k, v in batch.items()})
        docs = longest = None
        if "position_ids" in batch:
            if batch["position_ids"].is_cuda:
                raise ValueError(
                    "CapturedStep: pass position_ids on the CPU (each batch's documents are counted on the host "
                    "to stay within the recorded capacity)"
                )
            pos = batch["position_ids"]
            rows = batch["input_ids"].shape[0] if "input_ids" in batch else pos.shape[0]
            docs = documents(pos) * (rows // pos.shape[0])  # [1, S] position ids serve every row
            longest = longest_document(pos)
        if self._graph is not None:
            if docs is not None and (docs > self.doc_capacity or longest > self.doc_longest):
                self.eager_steps += 1
                return self._eager(batch)
            for key, value in batch.items():
                self._static[key].copy_(value, non_blocking=True)
            self._graph.replay()
            return self._out
        if self.calls <= self.warmup:
            self._docs_seen = max(self._docs_seen, docs or 0)
            self._longest_seen = max(self._longest_seen, longest or 0)
            return self._eager(batch)
        return self._capture(batch, docs, longest)

    def _eager(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        """One step run eagerly on the step's side stream (the capture's stream: cuBLAS workspaces, caches)."""
        current = torch.cuda.current_stream(self.device)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            out = self._body(batch)
        current.wait_stream(self._stream)
        return out

    def _capture(self, batch: dict[str, torch.Tensor], docs: int | None, longest: int | None) -> StepOutput:
        if docs is not None:
            from raytune_llm.models.settings import set_capture_docs

            want = max(8, 2 * max(self._docs_seen, docs))
            tokens = batch["input_ids"].numel() if "input_ids" in batch else batch["position_ids"].numel()
            self.doc_capacity = min(tokens, 1 << (want - 1).bit_length())  # never more documents than tokens
            # the longest document likewise: twice the longest seen, a power of two, at most the row
            want = 2 * max(self._longest_seen, longest)
            self.doc_longest = min(batch["position_ids"].shape[-1], 1 << (want - 1).bit_length())
            set_capture_docs(self.model, self.doc_capacity, self.doc_longest)
        self._static = {k: v.to(self.device).clone() for k, v in batch.items()}
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # what the eager steps cached goes back; the recording gets its own pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._out = self._body(self._static)
        except Exception as exc:
            self._static, self._out = {}, None
            raise RuntimeError(
                f"CapturedStep: CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "the forward read a device value on the host or ran an op that cannot be recorded"
            ) from exc
        self._graph = graph
        graph.replay()
        return self._out
