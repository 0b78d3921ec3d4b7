"""Attention over packed streams: one callable for local, ring, Ulysses and hybrid attention.

The algorithm and process groups of each micro-batch travel in its ``AttnContext.sp``
(``SPContext``); the attention object holds only the kernel choice.
"""

from __future__ import annotations

import torch

from seqpar.attention.context import AttentionFn, AttnContext, SPContext


def build_attention(kernel: str, device: torch.device, causal: bool = True) -> AttentionFn:
    """The model's attention (the layer code never changes): kernel ``kernels.attention``
    (auto | triton | sdpa_cpu | reference) resolved for ``device``; everything else comes per call from
    the context."""
    from seqpar.attention.sp import ContextAttention
    from seqpar.kernels.dispatch import resolve_impl

    return ContextAttention(resolve_impl(kernel, device), causal)


__all__ = ["AttnContext", "AttentionFn", "SPContext", "build_attention"]
