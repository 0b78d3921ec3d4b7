"""Hybrid (Ulysses x Ring): all-to-all to heads inside the adjacent Ulysses group, ring attention
over the strided ring group on the gathered tokens, all-to-all back.

SP rank ``ring_index * ulysses + ulysses_index``; after the Ulysses exchange, the ranks of ring
block j hold the concatenated tokens of SP ranks j*U .. j*U+U-1 for one head slice, and the
ring group (same Ulysses index) shares that head slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.attention.layout import Layout
from seqpar.attention.meta import StreamMeta, stream_for
from seqpar.attention.ring import ring_attention
from seqpar.attention.ulysses import ulysses_attention


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stream: StreamMeta,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    *,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "reference",
    return_lse: bool = False,
):
    """Collective over both groups. ``stream.layout`` must be the hybrid layout of U x R ranks."""
    u, r = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    if stream.layout.world != u * r:
        raise ValueError(f"layout is for {stream.layout.world} ranks but ulysses({u}) x ring({r}) = {u * r}")
    ring_index = dist.get_rank(ring_group)
    ring_blocks = [list(range(j * u, (j + 1) * u)) for j in range(r)]
    ring_metas = stream.blocks(ring_blocks)
    vis = stream.visibility(ring_blocks, causal)

    def inner(qh, kh, vh, meta):
        return ring_attention(qh, kh, vh, ring_metas, ring_group, causal=causal, scale=scale, impl=impl, vis=vis)

    metas = stream.blocks([[ring_index * u + i] for i in range(u)])
    return ulysses_attention(
        q, k, v, metas, ulysses_group, causal=causal, scale=scale, impl=impl, inner=inner, return_lse=return_lse,
        gathered=ring_metas[ring_index],
    )


def hybrid_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    layout: str | Layout = "zigzag",
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    impl: str = "reference",
):
    """Hybrid attention on this rank's shard of a packed stream (flash-attn ``*_varlen_func`` style).

    q: [T_local, heads, head_dim]; k, v: [T_local, kv_heads, head_dim] under the hybrid
    ``layout`` (``layout`` names the ring dimension's layout); cu_seqlens: the GLOBAL stream.
    Collective over both groups. Returns out in q's layout (and lse [heads, T_local] on request).
    """
    u, r = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    stream = stream_for(cu_seqlens, layout, q.device, ulysses=u, ring=r)
    return hybrid_attention(
        q, k, v, stream, ulysses_group, ring_group, causal=causal, scale=softmax_scale, impl=impl, return_lse=return_lse
    )
