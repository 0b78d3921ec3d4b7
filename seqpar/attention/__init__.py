"""Attention algorithms over packed streams: local now; ring, Ulysses and hybrid plug in here."""

from __future__ import annotations

import torch

from seqpar.attention.context import AttentionFn, AttnContext


def build_attention(kernel: str, device: torch.device, sp: int = 1) -> AttentionFn:
    """Pick the attention implementation from config (the layer code never changes).

    kernel: ``kernels.attention`` (auto | triton | reference); sp: sequence-parallel degree.
    """
    from seqpar.attention.local import LocalAttention
    from seqpar.kernels.dispatch import resolve_impl

    if sp != 1:
        raise NotImplementedError(f"parallel.sp={sp}: sequence-parallel attention is not available yet; use parallel.sp=1")
    return LocalAttention(resolve_impl(kernel, device))


__all__ = ["AttnContext", "AttentionFn", "build_attention"]
