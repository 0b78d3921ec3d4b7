"""Ring attention: K/V blocks rotate around the ring group while each rank keeps its queries.

Forward: P steps; the next (k, v) transfer is posted before computing on the current block, so
it overlaps compute; partial (out, lse) merge in fp32 (fused in place with the Triton kernel);
blocks with no visible key (host visibility matrix) are skipped. The output is saved once, in
the input dtype, with the fp32 lse.
Backward: from the final merged out/lse (never recomputing attention forward), delta =
rowsum(dout * out) once in fp32; (k, v) rotate again, dq accumulates locally in fp32, and a fp32
dK/dV accumulator travels with each block, the owner keeping its own block's gradient locally,
so an accumulator comes home in P-1 hops. Each step computes its block's dK/dV into fresh
buffers before waiting for the incoming accumulator, so that hop overlaps compute too
(event order recorded in ``parallel.comm.TRACE`` and tested).

Bytes sent per rank per call (b: bytes per k/v element, T/P tokens per rank):
forward (P-1) * 2 * (T/P) * h_kv * d * b; backward (P-1) * 2 * (T/P) * h_kv * d * (b + 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from seqpar.attention.layout import Layout
from seqpar.attention.meta import BlockMeta, stream_for, visibility
from seqpar.kernels.dispatch import get_impl, get_merge
from seqpar.kernels.reference import block_delta
from seqpar.parallel.comm import TRACE, RingExchange


def _empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of queries that see no key at all: zeros and -inf, in the compute dtype."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
    return q.new_zeros(q.shape, dtype=dtype), lse


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, metas, vis, group, causal, scale, impl):
        fwd, _ = get_impl(impl)
        merge = get_merge(impl)
        p, r = dist.get_world_size(group), dist.get_rank(group)
        mine = metas[r]
        out = lse = None
        kc, vc = k, v
        exchange = RingExchange(group, "ring_fwd_kv")
        for step in range(p):
            src = (r - step) % p
            if step < p - 1:  # the next block is in flight while this one computes
                n = metas[(src - 1) % p].size
                exchange.start([kc, vc], [((n, *k.shape[1:]), k.dtype)] * 2, step)
            if vis[r, src]:
                TRACE.record("compute", "ring_fwd", step)
                o, l = fwd(q, kc, vc, mine.doc, mine.pos, metas[src].doc, metas[src].pos, causal=causal, scale=scale)
                out, lse = (o, l) if out is None else merge(out, lse, o, l)
            if step < p - 1:
                kc, vc = exchange.wait(step)
        if out is None:  # no visible key anywhere (or no local tokens)
            out, lse = _empty_result(q)
        # Saved once, in the input dtype, as autograd's output (the o-projection saves the same
        # storage); delta is recomputed from it in fp32 once per backward, as FlashAttention-2 does.
        out = out.to(q.dtype).contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.metas, ctx.vis, ctx.group, ctx.causal, ctx.scale, ctx.impl = metas, vis, group, causal, scale, impl
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        metas, vis, group, causal, scale = ctx.metas, ctx.vis, ctx.group, ctx.causal, ctx.scale
        _, bwd = get_impl(ctx.impl)
        p, r = dist.get_world_size(group), dist.get_rank(group)
        mine = metas[r]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        delta = block_delta(dout, out, acc_dtype)  # [H, T_me], once per call, not per block
        dq = dk_own = dv_own = None
        kc, vc = k, v
        kv_ex = RingExchange(group, "ring_bwd_kv")
        acc_ex = RingExchange(group, "ring_bwd_acc")
        for step in range(p):
            src = (r - step) % p
            if step < p - 1:
                nxt = (metas[(src - 1) % p].size, *k.shape[1:])
                kv_ex.start([kc, vc], [(nxt, k.dtype)] * 2, step)
            # This block's dK/dV go into fresh buffers first; the incoming accumulator (twice the
            # K/V bytes, fp32) is waited for only afterwards, so its hop overlaps this compute.
            grads = None
            if vis[r, src]:
                TRACE.record("compute", "ring_bwd", step)
                grads = bwd(dout, q, kc, vc, out, lse, mine.doc, mine.pos, metas[src].doc, metas[src].pos,
                            causal=causal, scale=scale, delta=delta)
                dq = grads[0] if dq is None else dq.add_(grads[0])
            if step == 0:
                if grads is not None:
                    dk_own, dv_own = grads[1], grads[2]
            else:
                shape = (metas[src].size, *k.shape[1:])
                if step >= 2:
                    acc = acc_ex.wait(step)
                    if grads is not None:
                        acc[0].add_(grads[1])
                        acc[1].add_(grads[2])
                elif grads is not None:
                    acc = [grads[1], grads[2]]
                else:
                    acc = [torch.zeros(shape, dtype=acc_dtype, device=k.device) for _ in range(2)]
                # Send this block's accumulator on; receive the one for the block we hold next
                # (at the last step: our own block's, coming home).
                incoming = (metas[(src - 1) % p].size, *k.shape[1:])
                acc_ex.start(acc, [(incoming, acc_dtype)] * 2, step)
            if step < p - 1:
                kc, vc = kv_ex.wait(step)
        if p > 1:
            home = acc_ex.wait(p)
            dk_own = home[0] if dk_own is None else dk_own.add_(home[0])
            dv_own = home[1] if dv_own is None else dv_own.add_(home[1])
        if dq is None:
            dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        if dk_own is None:  # one rank, nothing visible
            dk_own, dv_own = (torch.zeros(k.shape, dtype=acc_dtype, device=k.device) for _ in range(2))
        return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype), None, None, None, None, None, None


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
    vis: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over ``group`` (collective). metas[i]: the block of ring rank i.

    q: [T_me, h, d]; k, v: [T_me, h_kv, d] with T_me == metas[rank].size. vis: the host
    [P, P] block visibility (``StreamMeta.visibility``, built once per micro-batch; computed
    here from the metas when omitted). Returns out like q and lse [h, T_me] fp32 (not
    differentiable). No host sync: every decision comes from the host metadata.
    """
    if len(metas) != dist.get_world_size(group):
        raise ValueError(f"ring attention got {len(metas)} block metas for a group of {dist.get_world_size(group)} ranks")
    me = metas[dist.get_rank(group)].size
    if q.shape[0] != me or k.shape[0] != me:
        raise ValueError(f"ring attention: this rank's layout holds {me} tokens but q has {q.shape[0]} and k {k.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    vis = visibility(metas, causal) if vis is None else vis
    return RingAttention.apply(q, k, v, list(metas), vis, group, causal, scale, impl)


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
    ranks = [[i] for i in range(p)]
    out, lse = ring_attention(q, k, v, stream.blocks(ranks), group, causal=causal, scale=softmax_scale, impl=impl,
                              vis=stream.visibility(ranks, causal))
    return (out, lse) if return_lse else out
