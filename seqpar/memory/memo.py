"""MEMO's token-wise policy (``memory.policy: memo``): offload plus token-wise recomputation, attention
never recomputed.

    engine = HostEngine(depth=1)
    apply_memory_policy(model.layers, "memo", engine=engine, keep_last=2, alpha=0.5)

For each of the first L - ``keep_last`` blocks, with T this rank's tokens and k = round(alpha T):

- the token-local stage before attention (norm, q/k/v projections, RoPE) runs on tokens [0, k)
  with its saved tensors offloaded, and on [k, T) under non-reentrant checkpointing, whose only
  saved tensors are its inputs (x[k:] and the RoPE rows: views of storages that move once);
- attention runs exactly once, on the concatenated q, k, v, outside any checkpoint region, so
  what it keeps for backward (q, k, v, output, lse; under Ulysses the all-to-all'ed copies) is
  offloaded and it never runs (or communicates) again;
- the stage after attention (output projection, residuals, norm, SwiGLU) splits the same way,
  its recomputed part reading the swapped-back block input and attention output.

Backward reloads the block's tensors (prefetched when the block above starts its backward),
recomputes the (1 - alpha) share of the token-local ops and runs attention's backward once.
alpha = 1 is ``offload``; alpha = 0 is ``selective`` with everything it keeps offloaded. The last
``keep_last`` blocks split their tokens the same way but keep their tensors on the device (their
backward starts at once: a reload could not be hidden). Under SP and
adaptive plans each rank splits its own shard: every op split is token-local, so the split
changes no result, only the order of the weight-gradient sums.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqpar.memory.offload import OffloadSession


def split_tokens(tokens: int, alpha: float) -> int:
    """k: how many of this rank's first ``tokens`` keep their token-local saved tensors."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"memory.alpha={alpha} must be in [0, 1]")
    return min(tokens, int(round(alpha * tokens)))


def memo_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx, k: int) -> torch.Tensor:
    """One block's forward with tokens [k, T) of its token-local stages under recomputation and
    attention run once. x: [T, dim]; cos, sin: fp32 [T, hd/2]; returns [T, dim]. Collective over
    ``ctx.sp.group`` (attention only) exactly as the block's own forward."""
    t = x.shape[0]
    if k >= t:
        return type(block).forward(block, x, cos, sin, ctx)
    # Each stage's recomputed part is built before its kept part: autograd runs the later-built nodes
    # first, so the kept tokens' tensors are freed before the rest is recomputed (the recompute then
    # adds (1 - 2 alpha) of a stage to the peak, not (1 - alpha)).
    later = checkpoint(block.pre_attention, x[k:], cos[k:], sin[k:], use_reentrant=False)
    if k > 0:
        first = block.pre_attention(x[:k], cos[:k], sin[:k])
        q, kk, v = (torch.cat(pair) for pair in zip(first, later))
    else:
        q, kk, v = later
    out = block.attention.attention(q, kk, v, ctx)
    tail = checkpoint(block.post_attention, x[k:], out[k:], use_reentrant=False)
    if k == 0:
        return tail
    return torch.cat((block.post_attention(x[:k], out[:k]), tail))


class MemoForward:
    """A block's forward under ``memo`` (see the module doc): tokens past ``alpha`` of the shard are
    recomputed, and (``offload``) the saved tensors go through the session's engine; the output's
    gradient hook marks the start of the block's backward (prefetch of the block below)."""

    policy = "memo"

    def __init__(self, block: nn.Module, layer: int, session: OffloadSession, alpha: float, offload: bool = True) -> None:
        split_tokens(0, alpha)  # validates alpha
        self.block, self.layer, self.session, self.alpha, self.offload = block, layer, session, alpha, offload

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        b = self.block
        if not torch.is_grad_enabled():
            return type(b).forward(b, x, cos, sin, ctx)
        session, layer = self.session, self.layer
        session.engine.begin_forward(layer)
        k = split_tokens(x.shape[0], self.alpha)
        if self.offload:
            with torch.autograd.graph.saved_tensors_hooks(session.pack(layer, b), session.unpack):
                out = memo_block(b, x, cos, sin, ctx, k)
        else:
            out = memo_block(b, x, cos, sin, ctx, k)
        if out.requires_grad:
            out.register_hook(lambda grad: session.begin_backward(layer))
        return out


def apply_memo(blocks: Iterable[nn.Module], session: OffloadSession, keep_last: int, alpha: float) -> None:
    """``memo`` on every block; all but the last ``keep_last`` offload."""
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        block.forward = MemoForward(block, i, session, alpha, offload=i < len(blocks) - keep_last)


def set_memo_alpha(blocks: Iterable[nn.Module], alpha: float) -> None:
    """Change alpha of blocks under ``memo`` (``memory.alpha: auto`` is solved after the model exists)."""
    split_tokens(0, alpha)
    for block in blocks:
        fwd = block.__dict__.get("forward")
        if isinstance(fwd, MemoForward):
            fwd.alpha = alpha
