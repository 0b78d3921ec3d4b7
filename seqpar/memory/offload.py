"""Activation offload (``memory.policy: offload``): every tensor a block saves for backward leaves the
device through a transfer engine (``seqpar.memory.transfer``), except in the last ``keep_last``
blocks, whose backward starts at once.

    engine = HostEngine(depth=1)
    apply_memory_policy(model.layers, "offload", engine=engine, keep_last=2)
    loss = model(tokens, ctx, labels=labels); loss.backward(); engine.end_step()

Saved-tensor hooks, tagged by layer, decide per tensor:
- parameters are skipped by storage, not by type: ``nn.Linear`` saves ``weight.t()``, a view that is
  no ``nn.Parameter``, and FSDP2 saves the gathered (unsharded) parameters, which are the block's
  registered parameters while its forward runs;
- tensors under ``min_bytes`` stay (an offload has a fixed cost);
- a storage moves once however many tensors view it: a later pack of the same storage, in this
  layer or another, reuses its handle, and unpack rebuilds each view (dtype, size, stride, offset).
Attention is not recomputed and runs once: the policy recomputes nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from seqpar.memory.transfer import Handle, TransferEngine

#: Saved tensors smaller than this stay on the device.
MIN_BYTES = 1024


@dataclass(frozen=True)
class Packed:
    """What autograd keeps for an offloaded tensor: its storage's handle and how to view it."""

    handle: Handle
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class OffloadSession:
    """Per-step state shared by the blocks: the engine, storages already offloaded, the parameters."""

    def __init__(self, engine: TransferEngine, min_bytes: int = MIN_BYTES) -> None:
        self.engine, self.min_bytes = engine, min_bytes
        self._storages: dict[int, tuple[Handle, weakref.ref]] = {}

    def pack(self, layer: int, block: nn.Module) -> Callable[[torch.Tensor], object]:
        params = {p.untyped_storage()._cdata for p in block.parameters() if p.device.type != "meta"}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in params or t.device.type == "meta":
                return t
            known = self._storages.get(key)
            if known is not None and known[1]() is None:  # that storage was freed; this is another one
                known = None
            if known is None:
                if storage.nbytes() < self.min_bytes:
                    return t
                data = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                # A storage's Python object lives exactly as long as the storage: a dead weak reference
                # means the key (its address) may now name another storage.
                known = self._storages[key] = (self.engine.offload(layer, data), weakref.ref(storage))
            else:
                known[0].uses += 1
                self.engine.reuse(known[0], layer)
            h = known[0]
            return Packed(h, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

        return pack

    def unpack(self, packed) -> torch.Tensor:
        if not isinstance(packed, Packed):
            return packed
        h = packed.handle
        data = self.engine.fetch(h)
        # A view of the fetched bytes (not set_ on their storage): views keep their base alive, so the
        # engine sees the reload buffer live exactly as long as autograd uses it.
        out = data.view(packed.dtype).as_strided(packed.size, packed.stride, packed.offset)
        h.uses -= 1
        if h.uses == 0:
            self.engine.release(h)
        return out

    def begin_backward(self, layer: int) -> None:
        """Block ``layer``'s output got its gradient: its backward starts (prefetch the block below).
        Block 0's also queues the end of this micro-batch's offload at the end of the backward pass."""
        self.engine.begin_backward(layer)
        if layer == 0:
            torch.autograd.Variable._execution_engine.queue_callback(self.end_step)

    def end_step(self) -> None:
        """After a micro-batch's backward: free its host copies and forget its storages."""
        self._storages.clear()
        self.engine.end_step()


class OffloadForward:
    """A block's forward with its saved tensors offloaded (``offload`` is True), or only the schedule
    kept (the last ``keep_last`` blocks: their backward still prefetches the block below). The
    output's gradient hook marks the start of the block's backward."""

    policy = "offload"

    def __init__(self, block: nn.Module, forward: Callable[..., torch.Tensor], layer: int,
                 session: OffloadSession, offload: bool) -> None:
        self.block, self.inner, self.layer, self.session, self.offload = block, forward, layer, session, offload

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.inner(x, *args, **kwargs)
        session, layer = self.session, self.layer
        session.engine.begin_forward(layer)
        if self.offload:
            with torch.autograd.graph.saved_tensors_hooks(session.pack(layer, self.block), session.unpack):
                out = self.inner(x, *args, **kwargs)
        else:
            out = self.inner(x, *args, **kwargs)
        if out.requires_grad:
            out.register_hook(lambda grad: session.begin_backward(layer))
        return out


def apply_offload(blocks: Iterable[nn.Module], session: OffloadSession, keep_last: int) -> None:
    """Offload every block's saved tensors but the last ``keep_last`` blocks'."""
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        block.forward = OffloadForward(block, block.forward, i, session, offload=i < len(blocks) - keep_last)
