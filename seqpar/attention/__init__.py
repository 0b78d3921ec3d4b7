"""Attention algorithms over packed streams: local now; ring, Ulysses and hybrid plug in here."""

from __future__ import annotations

import torch

from seqpar.attention.context import AttentionFn, AttnContext


def build_attention(kernel: str, device: torch.device, algorithm: str = "ring", groups=None) -> AttentionFn:
    """Pick the attention implementation from config (the layer code never changes).

    kernel: ``kernels.attention`` (auto | triton | reference); algorithm: ``parallel.algorithm``;
    groups: the run's seqpar.parallel Groups, or None for single-device attention. With an SP
    degree of 1 the local kernel runs directly.
    """
    from seqpar.attention.local import LocalAttention
    from seqpar.kernels.dispatch import resolve_impl

    impl = resolve_impl(kernel, device)
    if groups is None or groups.dims.sp == 1:
        return LocalAttention(impl)
    from seqpar.attention.sp import SequenceParallelAttention

    return SequenceParallelAttention(algorithm, groups, impl)


__all__ = ["AttnContext", "AttentionFn", "build_attention"]
