"""Transfer engines: where offloaded activations live between forward and backward, and when their
copies complete. Injected into the offload policy (``seqpar.memory.offload``), never chosen inside
the model.

    engine = HostEngine(depth=1)        # CPU runs and tests
    h = engine.offload(layer, t)        # forward: t's storage leaves the device (eventually)
    engine.begin_forward(layer + 1)     # offloads of layers <= layer + 1 - depth complete here
    engine.begin_backward(layer + 1)    # layer's reloads start (prefetch)
    t2 = engine.fetch(h)                # autograd's unpack: waits for the reload, returns the bytes

The schedule is TransformerEngine's offload synchroniser's, with in-flight depth k = ``depth``: the
offload of layer i must finish before layer i + k starts its forward (at most k layers of copies
in flight), and the reload of layer i starts when layer i + 1 starts its backward, so reloads are
prefetched, not issued when autograd unpacks. A reload always waits for its own offload first
(Megatron's fine-grained offload once reloaded before the first iteration's offload finished).

``HostEngine`` emulates that on CPU, where ``torch.cpu.Stream`` is a no-op and events and pinned
memory need CUDA: "device" bytes move into a separately accounted host pool; each copy is deferred
until its wait, and every buffer starts filled with 0xFF bytes (NaN in every float dtype), so a
missing wait gives NaN gradients deterministically instead of a race that passes by luck.
On a GPU the host engine is correct but synchronous (pageable copies on the compute stream, no
overlap). The CUDA engine (``seqpar.memory.cuda_engine``: pinned slabs sized from K, D2H and H2D
streams, one event per tensor) shares the schedule (``ScheduledEngine``) and moves the bytes
asynchronously.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

_POISON = 0xFF  # every byte 0xFF: NaN in fp32, bf16, fp16 and fp64


@dataclass(eq=False)
class Handle:
    """One offloaded storage: ``nbytes`` bytes saved by ``layer``'s forward.

    state: pending (on device, copy not waited) -> host -> reloading (device buffer allocated, copy
    not waited) -> device (fetched; held until the last of its ``uses`` is unpacked, then only weakly,
    so the buffer is freed as soon as backward is done with it).
    """

    layer: int
    nbytes: int
    uses: int = 1  # saved tensors over this storage not yet unpacked
    state: str = "pending"
    source: torch.Tensor | None = None  # the device bytes, held until the offload completes
    host: torch.Tensor | np.ndarray | None = None  # the host copy (HostEngine: a numpy array, outside torch)
    device: torch.Tensor | None = None  # the reload buffer, held until it is fetched
    fetched: weakref.ref | None = None
    home: torch.device = torch.device("cpu")  # where the bytes came from and are reloaded to
    event: torch.cuda.Event | None = None  # CUDA engine: the copy in flight (offload, then reload)


class TransferEngine(Protocol):
    """What the offload policy needs from an engine (see the module doc for the schedule)."""

    depth: int

    def offload(self, layer: int, data: torch.Tensor) -> Handle: ...

    def reuse(self, handle: Handle, layer: int) -> None: ...

    def fetch(self, handle: Handle) -> torch.Tensor: ...

    def release(self, handle: Handle) -> None: ...

    def begin_forward(self, layer: int) -> None: ...

    def begin_backward(self, layer: int) -> None: ...

    def end_step(self) -> None: ...


@dataclass
class EngineStats:
    """Bytes the engine holds, now and at their peak: on the device (offloads not yet complete and
    reload buffers) and in host memory; reloads not prefetched (issued by autograd's unpack)."""

    device_bytes: int = 0
    host_bytes: int = 0
    peak_device_bytes: int = 0
    peak_host_bytes: int = 0
    offloaded_bytes: int = 0
    late_reloads: int = 0

    def add(self, device: int = 0, host: int = 0) -> None:
        self.device_bytes += device
        self.host_bytes += host
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)


def _copy(dst: torch.Tensor | np.ndarray, src: torch.Tensor | np.ndarray) -> None:
    """dst[:] = src for flat uint8 buffers (tensors or the host pool's numpy arrays); on CPU through
    numpy, outside torch's dispatcher, so allocation trackers never see the pool as a tensor."""
    cpu = lambda x: isinstance(x, np.ndarray) or x.device.type == "cpu"  # noqa: E731
    if cpu(dst) and cpu(src):
        np.copyto(dst if isinstance(dst, np.ndarray) else dst.numpy(), src if isinstance(src, np.ndarray) else src.numpy())
    elif isinstance(src, np.ndarray):
        dst.copy_(torch.from_numpy(src))
    elif isinstance(dst, np.ndarray):  # device -> host pool (the host engine on a GPU: synchronous)
        np.copyto(dst, src.cpu().numpy())
    else:
        dst.copy_(src)


class ScheduledEngine:
    """The schedule every engine shares (see the module doc): handles per layer, offloads completed
    ``depth`` layers later, reloads prefetched one layer ahead in backward, a reload always after its
    offload. Subclasses move the bytes: ``_start_offload``, ``_wait_offload``, ``_start_reload``'s
    ``_copy_back``, ``_wait_reload`` and ``_free_host``."""

    def __init__(self, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"in-flight depth {depth} must be >= 1")
        self.depth = depth
        self.stats = EngineStats()
        self._by_layer: dict[int, list[Handle]] = {}

    # -- forward ---------------------------------------------------------------------------
    def offload(self, layer: int, data: torch.Tensor) -> Handle:
        """Start moving ``data`` (flat uint8 over a whole storage) off the device. The engine keeps a
        reference to it until the offload completes, so the bytes cannot be freed or reused while the
        copy is in flight (torchtune once deleted a tensor whose copy was still running)."""
        h = Handle(layer, data.numel(), source=data, home=data.device)
        self._start_offload(h)
        self._by_layer.setdefault(layer, []).append(h)
        self.stats.add(device=h.nbytes, host=h.nbytes)
        self.stats.offloaded_bytes += h.nbytes
        return h

    def reuse(self, h: Handle, layer: int) -> None:
        """A later ``layer`` saved the same storage again (the RoPE tables, saved by every layer): the
        reload is then prefetched for the latest layer that needs it, the first one backward reaches."""
        if layer > h.layer:
            self._by_layer[h.layer].remove(h)
            self._by_layer.setdefault(layer, []).append(h)
            h.layer = layer

    def begin_forward(self, layer: int) -> None:
        """Layer ``layer`` starts its forward: complete the offloads of layers <= layer - depth."""
        for i, handles in self._by_layer.items():
            if i <= layer - self.depth:
                for h in handles:
                    if h.state == "pending":
                        self._complete_offload(h)

    def _complete_offload(self, h: Handle) -> None:
        self._wait_offload(h)
        h.source = None  # the device bytes can go (the wait ordered their reuse after the copy)
        h.state = "host"
        self.stats.add(device=-h.nbytes)

    # -- backward --------------------------------------------------------------------------
    def begin_backward(self, layer: int) -> None:
        """Layer ``layer`` starts its backward: prefetch layer - 1's reloads."""
        for h in self._by_layer.get(layer - 1, []):
            if h.state in ("pending", "host"):
                self._start_reload(h)

    def _start_reload(self, h: Handle) -> None:
        if h.state == "pending":  # a reload waits for its own offload first
            self._complete_offload(h)
        h.device = self._copy_back(h)
        h.state = "reloading"
        self.stats.add(device=h.nbytes)

    def fetch(self, h: Handle) -> torch.Tensor:
        """The offloaded bytes on the device (uint8 [nbytes]), for autograd's unpack. A storage saved by
        several ops is fetched once per unpack: while one fetched copy lives, it is returned again."""
        if h.state == "device":
            alive = h.device if h.device is not None else h.fetched()
            if alive is not None:
                return alive
        if h.state != "reloading":  # not prefetched (or fetched, freed and needed again)
            self.stats.late_reloads += 1
            self._start_reload(h)
        self._wait_reload(h)
        h.state = "device"
        h.fetched = weakref.ref(h.device)
        weakref.finalize(h.device, self.stats.add, -h.nbytes)  # device bytes go when the last user drops them
        return h.device

    def release(self, h: Handle) -> None:
        """The last saved tensor over ``h`` was unpacked: keep the reloaded bytes only while autograd does."""
        h.device = None

    def end_step(self) -> None:
        """Free the host copies; forget every handle (a forward whose backward never ran leaks none)."""
        for handles in self._by_layer.values():
            for h in handles:
                if h.state == "pending":
                    self._wait_offload(h)  # the copy may still read the source: order its reuse after it
                elif h.state == "reloading":
                    self._wait_reload(h)  # prefetched, never unpacked: the copy may still write the buffer
                if h.state in ("pending", "reloading"):
                    self.stats.add(device=-h.nbytes)
                self.stats.add(host=-h.nbytes)
                h.source = h.host = h.device = None
                h.state = "released"
        self._by_layer.clear()
        self._free_host()

    # -- the copies (per engine) -------------------------------------------------------------
    def _start_offload(self, h: Handle) -> None:
        raise NotImplementedError

    def _wait_offload(self, h: Handle) -> None:
        raise NotImplementedError

    def _copy_back(self, h: Handle) -> torch.Tensor:
        raise NotImplementedError

    def _wait_reload(self, h: Handle) -> None:
        raise NotImplementedError

    def _free_host(self) -> None:
        """After a step: the host buffers may be reused or freed."""


class HostEngine(ScheduledEngine):
    """The CPU transfer engine: a host pool with deferred, poisoned copies (see the module doc)."""

    def _start_offload(self, h: Handle) -> None:
        # A numpy array, never a torch tensor: on CPU the pool shares the "device" with the model, and
        # allocation trackers (MemTracker counts even torch.from_numpy tensors) must see only what
        # stays on it.
        h.host = np.full(h.nbytes, _POISON, dtype=np.uint8)

    def _wait_offload(self, h: Handle) -> None:
        """The D2H copy's event: the bytes are on the host."""
        _copy(h.host, h.source)

    def _copy_back(self, h: Handle) -> torch.Tensor:
        return torch.full((h.nbytes,), _POISON, dtype=torch.uint8, device=h.home)

    def _wait_reload(self, h: Handle) -> None:
        """The H2D copy's event."""
        _copy(h.device, h.host)
