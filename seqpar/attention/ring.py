"""Ring attention: K/V blocks rotate around the ring group while each rank keeps its queries.

Forward: P steps; the next (k, v) transfer is posted before computing on the current block, so
it overlaps compute; partial (out, lse) merge in fp32; blocks with no visible key are skipped.
Backward: from the final merged out/lse (never recomputing attention forward); (k, v) rotate
again, dq accumulates locally in fp32, and a fp32 dK/dV accumulator travels with each block,
the owner keeping its own block's gradient locally, so an accumulator comes home in P-1 hops.

Bytes sent per rank per call (b: bytes per k/v element, T/P tokens per rank):
forward (P-1) * 2 * (T/P) * h_kv * d * b; backward (P-1) * 2 * (T/P) * h_kv * d * (b + 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from seqpar.attention.layout import Layout
from seqpar.attention.meta import BlockMeta, stream_for, visible
from seqpar.kernels.dispatch import get_impl
from seqpar.kernels.reference import merge
from seqpar.parallel.comm import RingExchange


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, metas, group, causal, scale, impl):
        fwd, _ = get_impl(impl)
        p, r = dist.get_world_size(group), dist.get_rank(group)
        mine = metas[r]
        out = lse = None
        kc, vc = k, v
        exchange = RingExchange(group, "ring_fwd_kv")
        for step in range(p):
            src = (r - step) % p
            if step < p - 1:
                n = metas[(src - 1) % p].size
                exchange.start([kc, vc], [((n, *k.shape[1:]), k.dtype)] * 2)
            if visible(mine, metas[src], causal):
                o, l = fwd(q, kc, vc, mine.doc, mine.pos, metas[src].doc, metas[src].pos, causal=causal, scale=scale)
                out, lse = (o, l) if out is None else merge(out, lse, o, l)
            if step < p - 1:
                kc, vc = exchange.wait()
        if out is None:  # no visible key anywhere (or no local tokens)
            dtype = torch.promote_types(q.dtype, torch.float32)
            out = q.new_zeros(q.shape, dtype=dtype)
            lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.metas, ctx.group, ctx.causal, ctx.scale, ctx.impl = metas, group, causal, scale, impl
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        metas, group, causal, scale = ctx.metas, ctx.group, ctx.causal, ctx.scale
        _, bwd = get_impl(ctx.impl)
        p, r = dist.get_world_size(group), dist.get_rank(group)
        mine = metas[r]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk_own = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv_own = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        kc, vc = k, v
        acc = None
        kv_ex = RingExchange(group, "ring_bwd_kv")
        acc_ex = RingExchange(group, "ring_bwd_acc")
        for step in range(p):
            src = (r - step) % p
            shape = (metas[src].size, *k.shape[1:])
            if step < p - 1:
                nxt = (metas[(src - 1) % p].size, *k.shape[1:])
                kv_ex.start([kc, vc], [(nxt, k.dtype)] * 2)
            if step == 1:
                acc = [torch.zeros(shape, dtype=acc_dtype, device=k.device) for _ in range(2)]
            elif step >= 2:
                acc = acc_ex.wait()
            if visible(mine, metas[src], causal):
                dq_b, dk_b, dv_b = bwd(
                    dout, q, kc, vc, out, lse, mine.doc, mine.pos, metas[src].doc, metas[src].pos, causal=causal, scale=scale
                )
                dq += dq_b
                if step == 0:
                    dk_own += dk_b
                    dv_own += dv_b
                else:
                    acc[0] += dk_b
                    acc[1] += dv_b
            if step >= 1:
                # Send this block's accumulator on; receive the one for the block we hold next
                # (at the last step: our own block's, coming home).
                incoming = (metas[(src - 1) % p].size, *k.shape[1:])
                acc_ex.start(acc, [(incoming, acc_dtype)] * 2)
            if step < p - 1:
                kc, vc = kv_ex.wait()
        if p > 1:
            home = acc_ex.wait()
            dk_own += home[0]
            dv_own += home[1]
        return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype), None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    metas: Sequence[BlockMeta],
    group: dist.ProcessGroup,
    *,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over ``group`` (collective). metas[i]: the block of ring rank i.

    q: [T_me, h, d]; k, v: [T_me, h_kv, d] with T_me == metas[rank].size. Returns out like q and
    lse [h, T_me] fp32 (not differentiable).
    """
    if len(metas) != dist.get_world_size(group):
        raise ValueError(f"ring attention got {len(metas)} block metas for a group of {dist.get_world_size(group)} ranks")
    me = metas[dist.get_rank(group)].size
    if q.shape[0] != me or k.shape[0] != me:
        raise ValueError(f"ring attention: this rank's layout holds {me} tokens but q has {q.shape[0]} and k {k.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return RingAttention.apply(q, k, v, list(metas), group, causal, scale, impl)


def ring_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    layout: str | Layout = "zigzag",
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    impl: str = "reference",
):
    """Ring attention on this rank's shard of a packed stream (flash-attn ``*_varlen_func`` style).

    q: [T_local, heads, head_dim]; k, v: [T_local, kv_heads, head_dim], this rank's tokens under
    ``layout`` (a name or a :class:`Layout` of the group); cu_seqlens: the GLOBAL stream's
    documents (int32, identical on every rank). Collective over ``group``. Returns out
    [T_local, heads, head_dim] in q's layout, and lse [heads, T_local] fp32 when requested.
    """
    p = dist.get_world_size(group)
    stream = stream_for(cu_seqlens, layout, q.device, ring=p)
    out, lse = ring_attention(q, k, v, [stream.block([i]) for i in range(p)], group, causal=causal, scale=softmax_scale, impl=impl)
    return (out, lse) if return_lse else out
