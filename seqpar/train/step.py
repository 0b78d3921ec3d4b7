"""One optimizer step's forward and backward over this rank's micro-batches (loss rule of
ARCHITECTURE.md), and the small collectives around it.

Each rank's loss is the sum of its token losses divided by the global number of target tokens
of the step; gradients are summed over dp x sp (FSDP's reduce-scatter, or ``all_reduce_grads``
for replicated parameters). Every layout, static or per-micro-batch, then gives the
single-device loss and gradients.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from seqpar.parallel.grad_sync import all_reduce_grads
from seqpar.train.batch import MicroBatch


@dataclass(frozen=True)
class StepResult:
    """loss: global mean over the step's target tokens; targets, tokens: global counts (each
    token once); local_finite: this rank's loss was finite (the NaN check agrees on it)."""

    loss: float
    targets: int
    tokens: int
    local_finite: bool


def all_reduce_sum(values: list[float], group: dist.ProcessGroup, device: torch.device) -> list[float]:
    """Sum of a few host numbers over ``group`` in fp64 (collective over ``group``)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def forward_backward_step(model: nn.Module, micro_batches: list[MicroBatch], group: dist.ProcessGroup,
                          device: torch.device, compute_dtype: torch.dtype, fsdp: bool,
                          poison: bool = False) -> StepResult:
    """Forward and backward of every micro-batch of this rank; gradients end up summed over
    ``group`` (dp x sp: every rank that holds a share of the step's tokens).

    Collective over ``group`` (the global token counts, the replicated gradient sum, the loss),
    and over each micro-batch's SP group inside attention. ``compute_dtype``: bf16 autocasts the
    replicated path (FSDP's mixed-precision policy casts its parameters instead); ``poison``
    makes the local loss NaN (fault injection).
    """
    local_targets = sum(b.num_targets for b in micro_batches)
    local_tokens = sum(b.num_tokens for b in micro_batches)
    global_targets, global_tokens = all_reduce_sum([local_targets, local_tokens], group, device)
    denom = max(global_targets, 1.0)
    autocast = (torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 and not fsdp
                else contextlib.nullcontext())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro_batches:
        with autocast:  # the LM head and loss run over token chunks inside the model (memory.loss_chunk_tokens)
            loss = model(b.tokens, b.ctx, labels=b.labels) / denom
        if poison:
            loss = loss * float("nan")
        loss.backward()
        loss_sum += loss.detach().double()
    if not fsdp:
        all_reduce_grads(model.parameters(), group)
    local = loss_sum.item()
    (global_loss,) = all_reduce_sum([local], group, device)
    return StepResult(global_loss, int(global_targets), int(global_tokens), math.isfinite(local))


def grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0: no clipping) and return it (collective under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def bad_ranks(local_ok: bool, group: dist.ProcessGroup, device: torch.device) -> list[int]:
    """Ranks of ``group`` whose local loss was not finite (collective over ``group``)."""
    flags = torch.zeros(dist.get_world_size(group), device=device)
    flags[dist.get_rank(group)] = 0.0 if local_ok else 1.0
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flags, group=group)
    return [r for r, f in enumerate(flags.tolist()) if f > 0]
