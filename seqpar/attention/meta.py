"""Per-rank token metadata for SP attention, built on the host once per micro-batch.

Everything a distributed attention path decides on (which key blocks a query block can see,
how many tokens each rank holds, whether a block is whole documents) follows from the global
``cu_seqlens`` and the layout, which are on the host. So it is computed here with numpy, once
per micro-batch, and the attention hot path never asks the device a question (no ``.item()``,
no ``bool(tensor)``): on a GPU the CPU can run ahead and queue every layer's kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seqpar.attention.layout import Layout


@dataclass(frozen=True)
class BlockMeta:
    """Tokens of one block (a rank's shard, or a group's gathered shards).

    doc, pos: [n] int32 on the device, global document id and position of each token (the
    kernels' mask inputs); lo, hi: host int64 [docs], smallest and largest position per
    document in the block (hi = -1 where the document is absent); whole: host int64
    [m + 1] cu_seqlens of the block when it is whole documents in stream order (every
    document's tokens all present, consecutive, positions 0..L-1), else None.
    """

    doc: torch.Tensor
    pos: torch.Tensor
    lo: np.ndarray
    hi: np.ndarray
    whole: np.ndarray | None

    @property
    def size(self) -> int:
        return int(self.doc.shape[0])


def host_docs_and_positions(cu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token document index and position of a packed stream, on the host (int64 [T] each)."""
    lengths = np.diff(cu)
    doc = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    pos = np.arange(int(cu[-1]), dtype=np.int64) - cu[:-1][doc]
    return doc, pos


def _whole_documents(doc: np.ndarray, pos: np.ndarray, cu: np.ndarray) -> np.ndarray | None:
    """cu_seqlens of the block when its tokens are whole documents in order, else None."""
    if doc.size == 0:
        return np.zeros(1, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], doc[1:] != doc[:-1]]))
    ids = doc[starts]
    lengths = np.diff(np.concatenate([starts, [doc.size]]))
    full = cu[ids + 1] - cu[ids]
    if np.unique(ids).size != ids.size or np.any(lengths != full):
        return None
    expected = np.arange(doc.size, dtype=np.int64) - np.repeat(starts, lengths)
    if np.any(pos != expected):
        return None
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def make_meta(doc: np.ndarray, pos: np.ndarray, cu: np.ndarray, device: torch.device) -> BlockMeta:
    """BlockMeta of the tokens with host ``doc``/``pos`` (int64 [n]) of a stream with ``cu``."""
    num_docs = max(cu.size - 1, 1)
    lo = np.full(num_docs, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(num_docs, -1, dtype=np.int64)
    np.minimum.at(lo, doc, pos)
    np.maximum.at(hi, doc, pos)
    to_dev = lambda a: torch.from_numpy(a.astype(np.int32)).to(device)  # noqa: E731  (an H2D copy, no sync)
    return BlockMeta(to_dev(doc), to_dev(pos), lo, hi, _whole_documents(doc, pos, cu))


def visible(q: BlockMeta, k: BlockMeta, causal: bool) -> bool:
    """Whether any query of ``q`` may attend to any key of ``k`` (same document, causal order); host only."""
    both = (q.hi >= 0) & (k.hi >= 0)
    if causal:
        both &= k.lo <= q.hi
    return bool(both.any())


def visibility(metas: Sequence[BlockMeta], causal: bool) -> np.ndarray:
    """bool [P, P]: entry (i, j) says whether block i's queries can see any of block j's keys."""
    return np.array([[visible(a, b, causal) for b in metas] for a in metas], dtype=bool).reshape(len(metas), len(metas))


class StreamMeta:
    """Global document ids and positions of a packed stream, and block metadata by rank.

    Every rank builds the same object from the global ``cu_seqlens`` and the layout, on the
    host, so no metadata is ever communicated and nothing here waits for the device.
    """

    def __init__(self, cu_seqlens: torch.Tensor | np.ndarray, layout: Layout, device: torch.device) -> None:
        # A host array or CPU tensor (the trainer keeps a host copy); a CUDA tensor costs one copy.
        cu = cu_seqlens.cpu().numpy() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        self.cu = np.asarray(cu, dtype=np.int64)
        self.doc, self.pos = host_docs_and_positions(self.cu)
        self.num_docs = max(self.cu.size - 1, 1)
        self.layout = layout
        self.device = device
        self._cache: dict[tuple[int, ...], BlockMeta] = {}
        self._vis: dict[tuple[tuple[tuple[int, ...], ...], bool], np.ndarray] = {}

    def block(self, ranks: Sequence[int]) -> BlockMeta:
        """Metadata of the listed ranks' tokens concatenated in that order (cached)."""
        key = tuple(ranks)
        if key not in self._cache:
            ix = self.layout.concat(list(key))
            self._cache[key] = make_meta(self.doc[ix], self.pos[ix], self.cu, self.device)
        return self._cache[key]

    def blocks(self, groups: Sequence[Sequence[int]]) -> list[BlockMeta]:
        return [self.block(g) for g in groups]

    def visibility(self, groups: Sequence[Sequence[int]], causal: bool) -> np.ndarray:
        """The P x P block visibility of ``groups`` (each a list of ranks), once per micro-batch."""
        key = (tuple(tuple(g) for g in groups), causal)
        if key not in self._vis:
            self._vis[key] = visibility(self.blocks(groups), causal)
        return self._vis[key]


def stream_for(
    cu_seqlens: torch.Tensor, layout: "str | Layout", device: torch.device, ulysses: int = 1, ring: int = 1
) -> StreamMeta:
    """StreamMeta for the public ``*_varlen_func`` APIs: ``layout`` is a name or a prebuilt Layout
    of ``ulysses x ring`` ranks (a clear error when it was built for another group size).
    ``cu_seqlens`` is read on the host once (a CUDA tensor costs one copy here, outside attention)."""
    from seqpar.attention.layout import build_layout

    cu = cu_seqlens.cpu().numpy() if isinstance(cu_seqlens, torch.Tensor) else np.asarray(cu_seqlens)
    world = ulysses * ring
    lay = layout if isinstance(layout, Layout) else build_layout(cu, layout, ulysses=ulysses, ring=ring)
    if lay.world != world:
        raise ValueError(f"layout is for {lay.world} ranks but the group has {world}; build it for this group")
    return StreamMeta(cu, lay, device)
