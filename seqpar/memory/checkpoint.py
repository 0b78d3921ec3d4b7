"""Activation checkpointing as a policy applied to a model's blocks from outside.

    apply_activation_checkpointing(model.layers)   # before FSDP, like torchtitan's apply_ac

Each block's ``forward`` is replaced on the instance by one that runs the original under
non-reentrant ``torch.utils.checkpoint`` while gradients are on: the block saves only its
inputs and recomputes its body in backward. Parameter names, state dicts and the layer code
are unchanged (a wrapper module would rename every parameter, and with it checkpoints and
the name-seeded init). FSDP's hooks stay outside the recomputed region, so under FSDP2 the
recompute finds the parameters already gathered by the pre-backward hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedForward:
    """A module's original forward, run under activation checkpointing when grad is enabled."""

    def __init__(self, forward: Callable[..., torch.Tensor]) -> None:
        self.inner = forward

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
        return self.inner(*args, **kwargs)


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Whole-block recompute for every module in ``blocks`` (``model.activation_checkpointing:
    true``). Idempotent: a block already checkpointed is left as it is."""
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), CheckpointedForward):
            block.forward = CheckpointedForward(block.forward)


def is_checkpointed(block: nn.Module) -> bool:
    return isinstance(block.__dict__.get("forward"), CheckpointedForward)
