"""The decoder layers' frozen base weights in pinned host memory, brought to the GPU one layer ahead of their use.

A QLoRA run holds every layer's NF4 base weights on the GPU for the whole step (3.25 GiB of packed NF4 at
Llama-3.1-8B; the quant state, 0.1 GiB, stays where it is), yet a layer reads its own only during its forward and,
checkpointed, during its backward. With `settings.set_weights_on_host` each layer's base weights sit in one pinned
host buffer; the patched layer loop copies layer ``i + 1``'s to the GPU on a side stream while layer ``i`` runs,
and a checkpointed layer's backward brings its own back (started by the backward of the layer above it): of the
checkpointed layers about three have theirs on the GPU at a time (the last one's between its forward and backward,
the next one's on its way, layer 0's between steps); a layer that is not checkpointed keeps its own while training,
for its backward. The memory goes to what the cap held back: more layers keeping their MLP outputs
(`keep_mlp_layers`, 448 MiB a layer at 4x2048 tokens of 8B, 2.3-5.4 ms a step each in sessions 12-14). The cost is
host-to-device PCIe time, 104 MiB a layer in the forward (where that direction is idle: the offloaded checkpoints go
the other way) and again in the backward (beside the checkpoints coming back). The weights are never written, so
the host copy is the only copy and nothing goes back. A parameter's ``.data`` points at the device buffer while its
layer runs and at its host view otherwise; the fused ops read whichever is bound, through `models.lora` as before
(a stashed O projection, kept until the layer's backward, reads its base at each use instead: the kept graph must
not hold the device copy). On the CPU the "device" buffer is a plain copy: the same code runs, which is what the
CPU tests prove.
"""

from __future__ import annotations

import torch

from raytune_llm.kernels._dispatch import side_stream, triton_next_power_of_2

_ALIGN = 256  # bytes: each weight's view starts aligned (the NF4 kernel reads 32-bit words)


class LayerWeights:
    """One decoder layer's frozen base weights: a pinned host buffer and, while fetched, a device copy.

    `fetch` starts the copy to the device (a no-op while one is there), `bind` points the parameters at it (the
    compute stream waiting for the copy), `unbind` points them back at the host and lets the device copy go.
    """

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device) -> None:
        self.params, self.device = params, device
        self.views: list[tuple[int, int, torch.dtype, torch.Size]] = []
        total = 0
        for p in params:
            n = p.data.numel() * p.data.element_size()
            self.views.append((total, n, p.data.dtype, p.data.shape))
            total += -(-n // _ALIGN) * _ALIGN
        self.host = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
        # what it takes: torch's pinned allocator rounds each block up to a power of two (104 -> 128 MiB a layer at 8B)
        self.pinned_bytes = triton_next_power_of_2(total) if device.type == "cuda" else total
        for p, view in zip(params, self.views):
            self._view(self.host, view).copy_(p.data)
        self.dev: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self._point(self.host)

    @staticmethod
    def _view(buf: torch.Tensor, view: tuple) -> torch.Tensor:
        start, n, dtype, shape = view
        return buf[start : start + n].view(dtype).view(shape)

    def _point(self, buf: torch.Tensor) -> None:
        for p, view in zip(self.params, self.views):
            p.data = self._view(buf, view)

    def fetch(self) -> None:
        """Start copying the weights to the device (side stream on CUDA); a no-op while a copy is there."""
        if self.dev is not None:
            return
        # Allocated on the compute stream that reads it (no record_stream, as models.attention_stash); the side stream
        # writes it only after what that stream had queued, which may have used the block.
        self.dev = torch.empty(self.host.numel(), dtype=torch.uint8, device=self.device)
        if self.device.type != "cuda":
            self.dev.copy_(self.host)
            return
        stream = side_stream(self.device, "host_weights")
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.dev.copy_(self.host, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(stream)

    def _wait(self) -> None:
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def bind(self) -> None:
        """Point the parameters at the device copy (fetched now if it was not), once the copy is done."""
        self.fetch()
        self._wait()
        self._point(self.dev)

    def unbind(self) -> None:
        """Point the parameters back at the host buffer; the device copy goes once nothing else holds it (a graph
        node of a layer that is not checkpointed keeps its own reference until its backward)."""
        self._wait()  # a copy never bound: its block must not be reused while the side stream writes it
        self._point(self.host)
        self.dev = None

    def restore(self) -> None:
        """The weights back on the device for good (the setting off, `unpatch`): a device copy of each."""
        self._wait()
        for p, view in zip(self.params, self.views):
            p.data = self._view(self.host, view).to(self.device, copy=True)
        self.dev = None


def layer_base_weights(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen base weights of a decoder layer's LoRA projections (PEFT's ``base_layer``), in module order."""
    out = []
    for module in layer.modules():
        base = getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not weight.requires_grad and all(weight is not p for p in out):
            out.append(weight)
    return out


def stream_layers(host_weights: list[LayerWeights] | None, i: int) -> None:
    """Before layer ``i``'s forward in the layer loop: its weights bound, the next layer's on their way.

    Args:
        host_weights: every layer's `LayerWeights` (None or empty: the weights are on the device, nothing to do).
        i: the layer about to run.
    """
    if host_weights:
        if i == 0 and host_weights[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            for weights in host_weights:  # left bound by an eager step: a graph reads only copies made in its capture
                weights.unbind()
        host_weights[i].bind()
        if i + 1 < len(host_weights):
            host_weights[i + 1].fetch()
