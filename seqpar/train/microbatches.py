"""From a step's streams to the micro-batches the model runs: the plug-in point where sequence
parallelism decides, per micro-batch, which algorithm runs over which pool group.

    builder = StaticSP(SPAssignment("ring", "zigzag", groups.sp_group), device)
    micro_batches = builder.build(streams, step)

Static SP is one assignment for every micro-batch; the adaptive executor (adaptive scattering)
implements the same ``MicroBatchBuilder`` protocol with a plan per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from seqpar.data.streams import Stream
from seqpar.train.batch import MicroBatch, SPAssignment, make_microbatch, shard_microbatch


class MicroBatchBuilder(Protocol):
    """Builds this rank's micro-batches of a step, each sharded for the group it runs on."""

    def build(self, streams: Sequence[Stream], step: int) -> list[MicroBatch]: ...


class StaticSP:
    """Static sequence parallelism: every micro-batch runs ``assignment`` (None: no SP, each
    rank holds whole streams). Layouts, labels, positions and document ids are computed on the
    global stream and sharded; nothing is communicated here."""

    def __init__(self, assignment: SPAssignment | None, device: torch.device) -> None:
        self.assignment = assignment
        self.device = device

    def build(self, streams: Sequence[Stream], step: int) -> list[MicroBatch]:
        """On the host (the data thread runs this; the feed moves the result to ``device``); the SP
        context is built for ``device``. An empty stream (varlen padding) runs an empty pass."""
        out = []
        host = torch.device("cpu")
        for s in streams:
            mb = make_microbatch(s.tokens, s.cu_seqlens, host)
            out.append(mb if self.assignment is None else shard_microbatch(mb, self.assignment, self.device))
        return out
