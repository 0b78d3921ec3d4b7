"""What every attention call receives besides q, k, v: the micro-batch's token metadata and, under
sequence parallelism, how this micro-batch is parallelised (algorithm, groups, layout).

Attention reads everything from the context on every call and holds no process group, so the
same model runs static SP (one context shape for every micro-batch) and adaptive plans (a
different algorithm and pool group per micro-batch) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from seqpar.attention.meta import StreamMeta
from seqpar.parallel.pool import SPGroup

#: Algorithms of a micro-batch split over an SP group of two or more ranks.
SP_ALGORITHMS: tuple[str, ...] = ("ring", "ulysses", "hybrid")


@dataclass(frozen=True)
class SPContext:
    """How one micro-batch's attention runs on this rank under sequence parallelism.

    algorithm: ring | ulysses | hybrid; group: this rank's pool group (``seqpar.parallel.pool``:
    the group's process groups and this rank's index in it); stream: the group's global stream,
    its layout over the group's ranks and every rank's document ids / positions (built on every
    rank from cu_seqlens, never communicated). Attention is collective over ``group``.
    """

    algorithm: str
    group: SPGroup
    stream: StreamMeta

    def __post_init__(self) -> None:
        if self.algorithm not in SP_ALGORITHMS:
            raise ValueError(f"SP algorithm {self.algorithm!r} is not one of {', '.join(map(repr, SP_ALGORITHMS))}")
        g = self.group
        if g.degree < 2:
            raise ValueError(f"an SP context needs a group of two or more ranks, got degree {g.degree}; "
                             "run a whole micro-batch with no SP context (local attention)")
        if self.stream.layout.world != g.degree:
            raise ValueError(f"the micro-batch is laid out for {self.stream.layout.world} ranks but its SP group "
                             f"has {g.degree}; build the layout for this group")
        if self.algorithm == "hybrid" and (g.ulysses is None or g.ring is None):
            raise ValueError(f"hybrid attention needs Ulysses and ring subgroups; group {g.shape} has "
                             f"ulysses={g.ulysses_degree} x ring={g.ring_degree}")


@dataclass
class AttnContext:
    """Token metadata of the local tokens, shared by all layers of one forward.

    positions: [T_local] int32, position of each token inside its document (global stream);
    doc_ids: [T_local] int32, document index of each token in the global stream;
    cu_seqlens: [docs + 1] int32, the global stream's documents (identical on every SP rank);
    sp: the SP context when the stream is split over a group of ranks; None when this rank
    holds the whole stream (single device, or a degree-1 group of an adaptive plan);
    host_cu: the same cu_seqlens on the host (int64 numpy), so attention can choose kernels
    for whole documents without reading the device (None: not known, use the general kernel).
    """

    positions: torch.Tensor
    doc_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    sp: SPContext | None = None
    host_cu: np.ndarray | None = None


class AttentionFn(Protocol):
    """q: [T_local, heads, head_dim]; k, v: [T_local, kv_heads, head_dim] -> out like q."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor: ...
