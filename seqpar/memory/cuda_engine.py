"""The CUDA transfer engine: activations offloaded to pinned host slabs on a D2H stream while the
next blocks compute, reloaded on an H2D stream one block ahead of backward (the schedule is
``seqpar.memory.transfer.ScheduledEngine``'s).

    engine = CudaEngine(torch.device("cuda", local_rank), layers=30, slab_bytes=per_block_bytes)
    apply_memory_policy(model.layers, "memo", engine=engine, keep_last=2, alpha=0.25)

- Host memory: one pinned slab per offloaded block, allocated once at ``slab_bytes`` (the estimator's
  bytes per block at the planner's K tokens per rank: micro-batches vary, so size for the largest
  and reuse). The pinned allocator rounds each block up to a power of two, so per-tensor pinned
  allocations would waste up to half the host memory and pay cudaHostAlloc in the step; tensors
  are carved from the slab at 512-byte alignment. A block that outgrows its slab gets an extra
  pinned buffer (counted in ``overflow_bytes``, a sign that K is set too high).
- Streams and events: the compute stream is asked for on every call (``current_stream``), never
  cached at construction (TRL cached it, wrong once FSDP2 or recomputation runs on another stream).
  An offload waits for the compute stream (the tensor was produced there), copies on the D2H stream
  and records an event; the compute stream waits on that event only ``depth`` blocks later
  (``begin_forward``), after which the device bytes may be reused. A reload waits for its offload's
  event (Megatron once reloaded before the first iteration's offload finished) and for the compute
  stream (the buffer was allocated there), copies on the H2D stream, and autograd's unpack makes the
  compute stream wait on the reload's event. No host synchronisation anywhere in the step.
"""

from __future__ import annotations

import warnings

import torch

from seqpar.memory.transfer import Handle, ScheduledEngine

#: Alignment of tensors carved from a slab (cudaMemcpyAsync is fastest on aligned addresses).
ALIGN = 512


class CudaEngine(ScheduledEngine):
    """Pinned-slab, two-stream transfer engine for one CUDA device (see the module doc)."""

    def __init__(self, device: torch.device, layers: int, slab_bytes: int, depth: int = 1) -> None:
        super().__init__(depth)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CudaEngine needs a CUDA device, got {device}; use HostEngine on CPU")
        self.device = device
        self.slab_bytes = _align(max(slab_bytes, 0))
        self._slabs = [torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(layers)]
        self._used = [0] * layers
        self._extra: list[torch.Tensor] = []
        self.overflow_bytes = 0
        self.d2h = torch.cuda.Stream(device)
        self.h2d = torch.cuda.Stream(device)

    def _host_region(self, layer: int, nbytes: int) -> torch.Tensor:
        if layer < len(self._slabs) and self._used[layer] + nbytes <= self.slab_bytes:
            start = self._used[layer]
            self._used[layer] = _align(start + nbytes)
            return self._slabs[layer][start:start + nbytes]
        if not self.overflow_bytes:
            warnings.warn(f"offloaded activations of block {layer} outgrew its {self.slab_bytes:,}-byte pinned slab; "
                          "allocating more (lower the tokens per rank, or size the slabs for more)", stacklevel=3)
        self.overflow_bytes += nbytes
        extra = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._extra.append(extra)
        return extra

    def _start_offload(self, h: Handle) -> None:
        compute = torch.cuda.current_stream(self.device)
        h.host = self._host_region(h.layer, h.nbytes)
        self.d2h.wait_stream(compute)  # the bytes were written on the compute stream
        with torch.cuda.stream(self.d2h):
            h.host.copy_(h.source, non_blocking=True)
            h.event = torch.cuda.Event()
            h.event.record(self.d2h)

    def _wait_offload(self, h: Handle) -> None:
        # The compute stream waits; the caller then drops the source, whose memory the caching
        # allocator hands out only to work queued after this wait.
        torch.cuda.current_stream(self.device).wait_event(h.event)

    def _copy_back(self, h: Handle) -> torch.Tensor:
        compute = torch.cuda.current_stream(self.device)
        buf = torch.empty(h.nbytes, dtype=torch.uint8, device=self.device)  # on the compute stream
        self.h2d.wait_stream(compute)  # the buffer's memory may still be read by earlier compute work
        self.h2d.wait_event(h.event)  # and the host bytes must have arrived
        with torch.cuda.stream(self.h2d):
            buf.copy_(h.host, non_blocking=True)
            h.event = torch.cuda.Event()
            h.event.record(self.h2d)
        return buf

    def _wait_reload(self, h: Handle) -> None:
        torch.cuda.current_stream(self.device).wait_event(h.event)

    def _free_host(self) -> None:
        # Every copy of the step was waited on by the compute stream, and the next step's offloads
        # wait for the compute stream first: the slabs can be refilled from their start.
        self._used = [0] * len(self._slabs)
        self._extra.clear()


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
