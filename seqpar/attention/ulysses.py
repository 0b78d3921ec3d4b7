"""Ulysses attention: all-to-all from token shards to head shards, attention on whole streams.

GQA: needs heads % P == 0. If kv_heads % P == 0 each rank gets kv_heads / P KV heads; else if
P % kv_heads == 0 KV heads are replicated inside the exchange with ``repeat_interleave`` (KV head
j to positions j*P/kv_heads .. (j+1)*P/kv_heads - 1, so rank r gets KV head r*kv_heads/P, which
serves its query heads), and autograd sums the replicas' gradients. Anything else is an error.

Bytes sent per rank per call, forward (h'_kv after replication):
(T/P) * (2h + 2h'_kv) * d * b * (P-1)/P; the backward sends the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from seqpar.attention.layout import Layout
from seqpar.attention.meta import BlockMeta, stream_for
from seqpar.kernels.autograd import block_attention
from seqpar.parallel.comm import head_to_seq, seq_to_head_many
from seqpar.parallel.dims import ulysses_head_error


def check_heads(heads: int, kv_heads: int, p: int) -> None:
    """One-line ValueError for head counts the Ulysses exchange cannot split (``ulysses_head_error``)."""
    err = ulysses_head_error(heads, kv_heads, p)
    if err:
        raise ValueError(err)


def _kv_for_exchange(k: torch.Tensor, p: int) -> torch.Tensor:
    kv_heads = k.shape[1]
    if kv_heads % p == 0:
        return k
    # Interleave, never tile: rank r must receive KV head r * kv_heads / P.
    return k.repeat_interleave(p // kv_heads, dim=1)


InnerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BlockMeta], tuple[torch.Tensor, torch.Tensor]]


def gathered_meta(metas: Sequence[BlockMeta]) -> BlockMeta:
    """Metadata of all ranks' tokens in rank order, from the per-rank metas (host merge, H2D copy)."""
    if len(metas) == 1:
        return metas[0]
    doc, pos = torch.cat([m.doc for m in metas]), torch.cat([m.pos for m in metas])
    lo = np.minimum.reduce([m.lo for m in metas])
    hi = np.maximum.reduce([m.hi for m in metas])
    return BlockMeta(doc, pos, lo, hi, None)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    metas: Sequence[BlockMeta],
    group: dist.ProcessGroup,
    *,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "reference",
    inner: InnerFn | None = None,
    return_lse: bool = False,
    gathered: BlockMeta | None = None,
):
    """Ulysses over ``group`` (collective). metas[i]: tokens of group rank i (their order is the
    gathered order); gathered: the metadata of all of them in that order (``StreamMeta.block``
    of every rank; merged from ``metas`` when omitted). q: [T_me, h, d]; k, v: [T_me, h_kv, d].
    ``inner`` replaces the local kernel on the gathered tokens (the hybrid plugs ring attention in
    here). Returns out like q, and lse [h, T_me] fp32 when requested.

    One all-to-all carries q, k and v (and one carries the output back); the backward mirrors it.
    """
    p = dist.get_world_size(group)
    check_heads(q.shape[1], k.shape[1], p)
    counts = [m.size for m in metas]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    qh, kh, vh = seq_to_head_many([q, _kv_for_exchange(k, p), _kv_for_exchange(v, p)], counts, group)
    meta = gathered_meta(metas) if gathered is None else gathered
    if inner is None:
        out_h, lse_h = block_attention(qh, kh, vh, meta.doc, meta.pos, meta.doc, meta.pos, causal=causal, scale=scale,
                                       impl=impl, return_lse=True, whole=meta.whole)
    else:
        out_h, lse_h = inner(qh, kh, vh, meta)
    out = head_to_seq(out_h, counts, group)
    if not return_lse:
        return out
    with torch.no_grad():
        # lse [h/P, T] -> [h, T_me]: the same exchange as the output, on a one-wide "head_dim".
        lse = head_to_seq(lse_h.float().t().unsqueeze(-1).contiguous(), counts, group, op_name="ulysses_lse")
        lse = lse.squeeze(-1).t().contiguous()
    return out, lse


def ulysses_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    layout: str | Layout = "contiguous",
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    impl: str = "reference",
):
    """Ulysses attention on this rank's shard of a packed stream (flash-attn ``*_varlen_func`` style).

    q: [T_local, heads, head_dim]; k, v: [T_local, kv_heads, head_dim] under ``layout``;
    cu_seqlens: the GLOBAL stream's documents. Collective over ``group``. Returns out in q's
    layout, and lse [heads, T_local] fp32 when requested.
    """
    p = dist.get_world_size(group)
    stream = stream_for(cu_seqlens, layout, q.device, ulysses=p)
    metas = stream.blocks([[i] for i in range(p)])
    return ulysses_attention(q, k, v, metas, group, causal=causal, scale=softmax_scale, impl=impl, return_lse=return_lse,
                             gathered=stream.block(list(range(p))))
