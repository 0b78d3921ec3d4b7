"""The LM head and cross-entropy over token chunks: no more than one chunk of logits ever exists.

    loss_sum = chunked_head_loss(h, weight, labels, chunk_tokens=4096)   # fp32 scalar

At long lengths the full-vocabulary logits are the largest activation of a step (16K tokens x 128K
vocabulary in fp32 is 8 GiB, and as much again for their gradient). Here the forward computes,
per chunk of tokens, the logits (in the compute dtype, upcast to fp32 as the unchunked head does),
their log-sum-exp and the target's logit, and keeps only the per-token log-sum-exp (fp32 [T]).
The backward recomputes each chunk's logits and turns them into the gradient in place:
softmax - one-hot, times the incoming scale, on rows with a target. Saved: the hidden states (an
input anyway), the labels and 4 bytes per token. Peak: one chunk of fp32 logits plus its gradient.
The head's weight may be tied to the embedding and may be an FSDP-unsharded parameter: the
function runs inside the model's forward, so FSDP keeps it gathered as it does for any layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _chunks(t: int, chunk: int) -> list[tuple[int, int]]:
    step = t if chunk <= 0 else chunk
    return [(i, min(t, i + step)) for i in range(0, t, max(step, 1))]


class ChunkedHeadLoss(torch.autograd.Function):
    """sum over tokens with a target of cross_entropy(h @ W^T, label); h [T, D], W [V, D], labels [T] int64."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        device_type = h.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        lse = torch.empty(h.shape[0], dtype=acc, device=h.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        for a, b in _chunks(h.shape[0], chunk):
            logits = F.linear(h[a:b], weight).to(acc)  # [n, V] fp32: the one chunk that exists
            lse[a:b] = torch.logsumexp(logits, dim=-1)
            y = labels[a:b]
            valid = y != IGNORE
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
            total += torch.where(valid, lse[a:b] - target, 0.0).sum()
            del logits
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, labels, lse = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        cdt = dtype if enabled else torch.promote_types(h.dtype, weight.dtype)  # what F.linear computed in
        w = weight.to(cdt)
        with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
            for a, b in _chunks(h.shape[0], ctx.chunk):
                g = F.linear(h[a:b], weight).to(lse.dtype)  # recomputed, then turned into d(loss)/d(logits)
                y = labels[a:b]
                valid = (y != IGNORE).to(lse.dtype)
                g.sub_(lse[a:b, None]).exp_()  # softmax
                g.scatter_add_(1, y.clamp(min=0)[:, None], -valid[:, None])  # - one-hot, no host sync
                g.mul_((grad * valid)[:, None])
                gc = g.to(cdt)
                del g
                hc = h[a:b].to(cdt)
                if dh is not None:
                    dh[a:b] = (gc @ w).to(h.dtype)
                if dw is not None:
                    dw.add_(gc.t() @ hc)
                del gc
        return dh, None if dw is None else dw.to(weight.dtype), None, None


def chunked_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Sum of token cross-entropy of the LM head over ``chunk_tokens``-token chunks (0: one chunk).

    h: [T, D] final hidden states (after the norm); weight: [V, D] (tied or not); labels: [T] int64
    with -100 where a token has no target. Returns an fp32 scalar; divide by the global target count.
    """
    return ChunkedHeadLoss.apply(h, weight, labels, int(chunk_tokens))
