"""Activation memory policies, applied to a model's blocks from outside (``memory.policy``).

    apply_memory_policy(model.layers, "selective")   # before FSDP, like torchtitan's apply_ac

- ``none``: autograd keeps everything each block saves.
- ``full``: each block runs under non-reentrant ``torch.utils.checkpoint`` and keeps only its input;
  backward recomputes the whole block, attention (and, under SP, its communication) included.
- ``selective``: LightSeq's checkpoint placement. The token-local stages around attention
  (``Block.pre_attention``: norm, q/k/v projections, RoPE; ``Block.post_attention``: output
  projection, residuals, norm, MLP) run under checkpointing; attention runs once, outside any
  checkpoint region, and keeps what its backward needs (q, k, v, output, lse). Backward recomputes
  only the token-local ops: attention's forward and its collectives never run twice.
- ``offload``: every tensor a block saves leaves the device through a transfer engine, except in the
  last ``keep_last`` blocks (``seqpar.memory.offload``); nothing is recomputed.
- ``memo``: offload plus token-wise recomputation (``seqpar.memory.memo``): attention runs once and
  its tensors and the block input are offloaded; the token-local ops keep (offloaded) their saved
  tensors for the first ``alpha`` of the tokens and recompute the rest in backward.

Each block's ``forward`` is replaced on the instance, so parameter names, state dicts and the layer
code are unchanged (a wrapper module would rename every parameter, and with it checkpoints and the
name-seeded init). FSDP's hooks stay outside the recomputed regions, so under FSDP2 a recompute
finds the parameters already gathered by the pre-backward hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqpar.config import MEMORY_POLICIES
from seqpar.memory.transfer import TransferEngine


class CheckpointedForward:
    """A module's original forward, run under activation checkpointing when grad is enabled (``full``)."""

    policy = "full"

    def __init__(self, forward: Callable[..., torch.Tensor]) -> None:
        self.inner = forward

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
        return self.inner(*args, **kwargs)


class SelectiveForward:
    """A block's forward with its token-local stages recomputed and attention run once (``selective``).

    x: [T, dim] block input; cos, sin: fp32 RoPE tables [T, hd/2]; ctx: the micro-batch's
    AttnContext. Collective over ``ctx.sp.group`` (attention) exactly as the plain forward is.
    """

    policy = "selective"

    def __init__(self, block: nn.Module) -> None:
        # The stages are looked up on each call (not bound here) so the block's own methods stay the
        # single definition of the layer; holding the block is a reference cycle the GC collects.
        self.block = block

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        b = self.block
        if not torch.is_grad_enabled():
            return type(b).forward(b, x, cos, sin, ctx)  # the class's forward: this object replaced the instance's
        q, k, v = checkpoint(b.pre_attention, x, cos, sin, use_reentrant=False)
        out = b.attention.attention(q, k, v, ctx)
        return checkpoint(b.post_attention, x, out, use_reentrant=False)


def memory_policy_of(block: nn.Module) -> str:
    """The policy applied to ``block``: none | full | selective | offload | memo."""
    return getattr(block.__dict__.get("forward"), "policy", "none")


def apply_memory_policy(blocks: Iterable[nn.Module], policy: str, engine: TransferEngine | None = None,
                        keep_last: int = 2, alpha: float = 1.0) -> None:
    """Apply ``policy`` (none | full | selective | offload | memo) to every block; idempotent for the
    same policy, an error for a block that already has another (apply one policy, once, before FSDP).
    ``offload`` and ``memo`` move saved tensors through ``engine`` (default: a ``HostEngine``) for all
    blocks but the last ``keep_last``; ``memo`` recomputes the token-local ops of the last
    (1 - ``alpha``) of each rank's tokens (``seqpar.memory.memo``)."""
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"memory.policy={policy!r}: choose one of {', '.join(MEMORY_POLICIES)}")
    blocks = list(blocks)
    if policy in ("offload", "memo"):
        current = {memory_policy_of(b) for b in blocks} - {"none"}
        if current and current != {policy}:
            raise ValueError(f"block already has memory policy {sorted(current)[0]!r}; cannot apply {policy!r} on top of it")
        if not current:
            from seqpar.memory.memo import apply_memo
            from seqpar.memory.offload import OffloadSession, apply_offload
            from seqpar.memory.transfer import HostEngine

            session = OffloadSession(engine or HostEngine())
            if policy == "offload":
                apply_offload(blocks, session, keep_last)
            else:
                apply_memo(blocks, session, keep_last, alpha)
        return
    for block in blocks:
        current = memory_policy_of(block)
        if current == policy:
            continue
        if current != "none":
            raise ValueError(f"block already has memory policy {current!r}; cannot apply {policy!r} on top of it")
        if policy == "full":
            block.forward = CheckpointedForward(block.forward)
        elif policy == "selective":
            block.forward = SelectiveForward(block)


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Whole-block recompute (``memory.policy: full``, or ``model.activation_checkpointing: true``)."""
    apply_memory_policy(blocks, "full")
