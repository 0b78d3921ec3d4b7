"""Gradient reduction for replicated parameters (the tiny-model path; FSDP replaces it at scale)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def all_reduce_grads(params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup, bucket_bytes: int = 32 << 20) -> None:
    """Sum gradients over ``group`` in flat buckets (collective over ``group``).

    Sum, not mean: each rank's loss is already divided by the global token count, so the sum
    over dp x sp ranks gives the single-device gradient.
    """
    if dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)
            bucket, size = [], 0
