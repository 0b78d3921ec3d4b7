"""The attention a model layer calls: local, ring, Ulysses or hybrid, as the micro-batch says.

The layer code never changes (Megatron-core's layer-spec idea): it calls ``attention(q, k, v,
ctx)`` on its local tokens and gets the output for the same tokens. Which algorithm runs, and
over which process groups, travels with the micro-batch in ``ctx.sp`` (``SPContext``), so the
attention object holds only the kernel choice: static SP builds the same context for every
micro-batch, adaptive scattering a different one per micro-batch.
"""

from __future__ import annotations

import torch

from seqpar.attention.context import AttnContext
from seqpar.attention.hybrid import hybrid_attention
from seqpar.attention.ring import ring_attention
from seqpar.attention.ulysses import ulysses_attention
from seqpar.kernels.autograd import block_attention


class ContextAttention:
    """Document-causal attention over packed streams, parallelised as ``ctx.sp`` says.

    impl: a resolved kernel implementation ("reference", "sdpa_cpu" or "triton"); causal: causal masking
    within documents. Holds no process group. Collective over ``ctx.sp.group`` when ``ctx.sp``
    is set (all ranks of the group call it in the same order); local otherwise.
    """

    def __init__(self, impl: str = "reference", causal: bool = True) -> None:
        self.impl = impl
        self.causal = causal

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        sp = ctx.sp
        if sp is None:  # this rank holds the whole stream
            return block_attention(q, k, v, ctx.doc_ids, ctx.positions, ctx.doc_ids, ctx.positions,
                                   causal=self.causal, impl=self.impl, whole=ctx.host_cu)
        g, kw = sp.group, dict(causal=self.causal, impl=self.impl)
        if sp.algorithm == "hybrid":
            return hybrid_attention(q, k, v, sp.stream, g.ulysses, g.ring, **kw)
        ranks = [[i] for i in range(g.degree)]
        metas = sp.stream.blocks(ranks)
        if sp.algorithm == "ring":
            return ring_attention(q, k, v, metas, g.sp, vis=sp.stream.visibility(ranks, self.causal), **kw)[0]
        return ulysses_attention(q, k, v, metas, g.sp, gathered=sp.stream.block(list(range(g.degree))), **kw)
