"""Per-rank token metadata for SP attention: document ids, positions, and a cheap visibility test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seqpar.attention.layout import Layout
from seqpar.kernels.varlen import doc_ids_and_positions


@dataclass
class BlockMeta:
    """Tokens of one block (a rank's shard, or a group's gathered shards).

    doc, pos: [n] int32 global document id and position of each token; lo, hi: [docs] int64
    smallest and largest position per document in the block (-1 in hi where absent).
    """

    doc: torch.Tensor
    pos: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.doc.numel())


def make_meta(doc: torch.Tensor, pos: torch.Tensor, num_docs: int) -> BlockMeta:
    big = torch.iinfo(torch.int64).max
    lo = torch.full((num_docs,), big, dtype=torch.int64, device=doc.device)
    hi = torch.full((num_docs,), -1, dtype=torch.int64, device=doc.device)
    if doc.numel():
        lo.scatter_reduce_(0, doc.long(), pos.long(), "amin")
        hi.scatter_reduce_(0, doc.long(), pos.long(), "amax")
    return BlockMeta(doc, pos, lo, hi)


def visible(q: BlockMeta, k: BlockMeta, causal: bool) -> bool:
    """Whether any query of ``q`` may attend to any key of ``k`` (same document, and causal order)."""
    both = (q.hi >= 0) & (k.hi >= 0)
    if causal:
        both &= k.lo <= q.hi
    return bool(both.any())


class StreamMeta:
    """Global document ids and positions of a packed stream, and block metadata by rank.

    Every rank builds the same object from the global ``cu_seqlens`` and the layout, so no
    metadata is ever communicated.
    """

    def __init__(self, cu_seqlens: torch.Tensor | np.ndarray, layout: Layout, device: torch.device) -> None:
        cu = torch.as_tensor(np.asarray(cu_seqlens.cpu() if torch.is_tensor(cu_seqlens) else cu_seqlens), dtype=torch.int32)
        self.doc, self.pos = doc_ids_and_positions(cu)
        self.doc, self.pos = self.doc.to(device), self.pos.to(device)
        self.num_docs = max(int(cu.numel()) - 1, 1)
        self.layout = layout
        self.device = device
        self._cache: dict[tuple[int, ...], BlockMeta] = {}

    def block(self, ranks: Sequence[int]) -> BlockMeta:
        """Metadata of the listed ranks' tokens concatenated in that order (cached)."""
        key = tuple(ranks)
        if key not in self._cache:
            ix = torch.as_tensor(self.layout.concat(list(ranks)), device=self.device)
            self._cache[key] = make_meta(self.doc[ix], self.pos[ix], self.num_docs)
        return self._cache[key]


def stream_for(
    cu_seqlens: torch.Tensor, layout: "str | Layout", device: torch.device, ulysses: int = 1, ring: int = 1
) -> StreamMeta:
    """StreamMeta for the public ``*_varlen_func`` APIs: ``layout`` is a name or a prebuilt Layout
    of ``ulysses x ring`` ranks (a clear error when it was built for another group size)."""
    from seqpar.attention.layout import build_layout

    world = ulysses * ring
    lay = layout if isinstance(layout, Layout) else build_layout(cu_seqlens.cpu().numpy(), layout, ulysses=ulysses, ring=ring)
    if lay.world != world:
        raise ValueError(f"layout is for {lay.world} ranks but the group has {world}; build it for this group")
    return StreamMeta(cu_seqlens, lay, device)
