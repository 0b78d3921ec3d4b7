"""Single-device attention on a packed stream (no sequence parallelism)."""

from __future__ import annotations

import torch

from seqpar.attention.context import AttnContext
from seqpar.kernels.autograd import block_attention


class LocalAttention:
    """Document-causal attention over the whole local stream through the kernel contract.

    impl: a resolved kernel implementation name ("reference" or "triton").
    """

    def __init__(self, impl: str = "reference", causal: bool = True) -> None:
        self.impl = impl
        self.causal = causal

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return block_attention(
            q, k, v, ctx.doc_ids, ctx.positions, ctx.doc_ids, ctx.positions, causal=self.causal, impl=self.impl
        )
