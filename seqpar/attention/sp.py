"""The attention a model layer calls under sequence parallelism, picked by ``parallel.algorithm``.

The layer code never changes (Megatron-core's layer-spec idea): it calls ``attention(q, k, v,
ctx)`` on its local tokens and gets the output for the same tokens; which algorithm runs, and
over which groups, is decided here once from the config.
"""

from __future__ import annotations

import torch

from seqpar.attention.context import AttnContext
from seqpar.attention.hybrid import hybrid_attention
from seqpar.attention.ring import ring_attention
from seqpar.attention.ulysses import ulysses_attention


class SequenceParallelAttention:
    """Ring, Ulysses or hybrid attention over the SP groups of ``groups`` (a seqpar.parallel Groups).

    Collective over the SP group on every call: all ranks of the group call it in the same order.
    """

    def __init__(self, algorithm: str, groups, impl: str, causal: bool = True) -> None:
        if algorithm not in ("ring", "ulysses", "hybrid"):
            raise ValueError(f"parallel.algorithm={algorithm!r} is not allowed; choose one of 'ring', 'ulysses', 'hybrid'")
        self.algorithm = algorithm
        self.groups = groups
        self.impl = impl
        self.causal = causal
        self.sp = groups.dims.sp

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        stream = ctx.stream
        if stream is None or stream.layout.world != self.sp:
            raise ValueError("sequence-parallel attention needs the micro-batch sharded with a layout of the SP group")
        kw = dict(causal=self.causal, impl=self.impl)
        if self.algorithm == "ring":
            metas = [stream.block([i]) for i in range(self.sp)]
            return ring_attention(q, k, v, metas, self.groups.sp, **kw)[0]
        if self.algorithm == "ulysses":
            metas = [stream.block([i]) for i in range(self.sp)]
            return ulysses_attention(q, k, v, metas, self.groups.sp, **kw)
        return hybrid_attention(q, k, v, stream, self.groups.ulysses, self.groups.ring, **kw)
