"""Sharding a packed stream over the ranks of a sequence-parallel group (pure, no processes).

A layout is, for every rank of the group, the sorted global indices of the tokens it holds.
Tokens, labels, positions and document ids are sharded together by indexing with them, and
because a layout is derived only from the global ``cu_seqlens``, every rank can compute every
other rank's document ids and positions without receiving them.

- contiguous: rank r holds [r*T/P, (r+1)*T/P) (sizes differ by at most one).
- zigzag (per document): a document of length L >= 2P is cut into 2P chunks and rank r takes
  chunks r and 2P-1-r, which balances causal work. Chunk sizes differ by at most one token and
  the chunks that get the extra tokens rotate from document to document. Shorter documents go
  whole to the rank with the least causal work so far. A rank may hold zero tokens.
- hybrid: zigzag over the ring degree, then contiguous inside each Ulysses group; SP rank
  ``ring_index * ulysses + ulysses_index`` (Ulysses ranks adjacent, as in the mesh).
- megatron: Megatron-core's context-parallel ``thd`` layout (every document padded to a multiple
  of 2P, chunks r and 2P-1-r on rank r); its pad tokens are documents of their own
  (``with_pad_documents``), so the kernels' document mask keeps them apart. Any algorithm runs on
  any layout: the block metadata carries each token's document and position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Layout:
    """Global token indices per rank. ``indices[r]``: int64 [tokens of rank r], ascending."""

    kind: str
    indices: tuple[np.ndarray, ...]
    total: int

    @property
    def world(self) -> int:
        return len(self.indices)

    def counts(self) -> list[int]:
        return [int(ix.size) for ix in self.indices]

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rows of the global tensor x ([T, ...]) that ``rank`` holds."""
        if x.shape[0] != self.total:
            raise ValueError(f"layout was built for {self.total} tokens, tensor has {x.shape[0]}")
        return x[torch.as_tensor(self.indices[rank], device=x.device)]

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`shard` over all ranks: [T, ...] from per-rank [T_r, ...]."""
        if len(shards) != self.world:
            raise ValueError(f"unshard needs {self.world} shards, got {len(shards)}")
        ref = shards[0]
        out = ref.new_empty((self.total, *ref.shape[1:]))
        for ix, s in zip(self.indices, shards):
            out[torch.as_tensor(ix, device=out.device)] = s
        return out

    def concat(self, ranks: Sequence[int]) -> np.ndarray:
        """Global indices of the listed ranks' tokens, concatenated in that order."""
        return np.concatenate([self.indices[r] for r in ranks]) if ranks else np.zeros(0, np.int64)


def _check(cu_seqlens: np.ndarray, world: int) -> np.ndarray:
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 1 or cu[0] != 0 or np.any(np.diff(cu) < 0):
        raise ValueError("cu_seqlens must be 1-D, start at 0 and be non-decreasing")
    if world < 1:
        raise ValueError(f"world size {world} must be >= 1")
    return cu


def contiguous_layout(total_tokens: int, world: int) -> Layout:
    """Rank r holds one contiguous run; the first ``T % P`` ranks hold one extra token."""
    if world < 1:
        raise ValueError(f"world size {world} must be >= 1")
    base, rem = divmod(total_tokens, world)
    sizes = [base + (1 if r < rem else 0) for r in range(world)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return Layout("contiguous", tuple(np.arange(starts[r], starts[r + 1], dtype=np.int64) for r in range(world)), total_tokens)


def _causal_pairs(a: int, b: int) -> int:
    """Visible (query, key) pairs of positions [a, b) of one document under causal attention."""
    return (b * (b + 1) - a * (a + 1)) // 2


def zigzag_layout(cu_seqlens: np.ndarray, world: int, min_doc_len: int | None = None) -> Layout:
    """Per-document zigzag sharding; documents shorter than ``min_doc_len`` (default 2P) go whole."""
    cu = _check(cu_seqlens, world)
    threshold = max(2 * world, min_doc_len or 0)
    n_chunks = 2 * world
    parts: list[list[np.ndarray]] = [[] for _ in range(world)]
    work = np.zeros(world, dtype=np.float64)
    tokens = np.zeros(world, dtype=np.int64)
    rotate = 0
    for d in range(cu.size - 1):
        start, end = int(cu[d]), int(cu[d + 1])
        length = end - start
        if length == 0:
            continue
        if length < threshold:
            # Ties go to the rank holding fewer tokens, then the lowest rank: deterministic.
            r = int(np.lexsort((np.arange(world), tokens, work))[0])
            parts[r].append(np.arange(start, end, dtype=np.int64))
            work[r] += _causal_pairs(0, length)
            tokens[r] += length
            continue
        base, rem = divmod(length, n_chunks)
        # Chunk c gets an extra token when it is among the `rem` chunks after the rotation point.
        extra = ((np.arange(n_chunks) - rotate) % n_chunks) < rem
        rotate = (rotate + rem) % n_chunks
        sizes = base + extra.astype(np.int64)
        offs = np.concatenate([[0], np.cumsum(sizes)])
        for r in range(world):
            for c in (r, n_chunks - 1 - r):
                a, b = int(offs[c]), int(offs[c + 1])
                parts[r].append(np.arange(start + a, start + b, dtype=np.int64))
                work[r] += _causal_pairs(a, b)
                tokens[r] += b - a
    indices = tuple(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
    return Layout("zigzag", indices, int(cu[-1]))


def hybrid_layout(cu_seqlens: np.ndarray, ulysses: int, ring: int, ring_layout: str = "zigzag") -> Layout:
    """Zigzag (or contiguous) over ``ring``, then contiguous inside each Ulysses group of ``ulysses``."""
    if ring_layout not in LAYOUTS:
        raise ValueError(f"parallel.layout={ring_layout!r} is not allowed; choose one of {', '.join(map(repr, LAYOUTS))}")
    cu = _check(cu_seqlens, ulysses * ring)
    outer = zigzag_layout(cu, ring) if ring_layout == "zigzag" else contiguous_layout(int(cu[-1]), ring)
    indices = []
    for r in range(ring):
        block = outer.indices[r]
        inner = contiguous_layout(block.size, ulysses)
        indices.extend(block[ix] for ix in inner.indices)
    return Layout(f"hybrid-{ring_layout}", tuple(indices), int(cu[-1]))


def build_layout(cu_seqlens: np.ndarray, kind: str, ulysses: int = 1, ring: int = 1) -> Layout:
    """The layout of one stream for an SP group of ``ulysses x ring`` ranks.

    kind: "zigzag" or "contiguous". With both degrees > 1 it is the hybrid layout whose ring
    dimension uses ``kind``; with one degree it is ``kind`` over all ranks.
    """
    if kind not in LAYOUTS:
        raise ValueError(f"parallel.layout={kind!r} is not allowed; choose one of {', '.join(map(repr, LAYOUTS))}")
    cu = _check(cu_seqlens, ulysses * ring)
    if ulysses > 1 and ring > 1:
        return hybrid_layout(cu, ulysses, ring, kind)
    world = ulysses * ring
    return zigzag_layout(cu, world) if kind == "zigzag" else contiguous_layout(int(cu[-1]), world)


def causal_work(layout: Layout, cu_seqlens: np.ndarray, rank: int, causal: bool = True) -> int:
    """Visible (query, key) pairs whose query is on ``rank`` (keys anywhere): the rank's attention work."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    ix = layout.indices[rank]
    if ix.size == 0:
        return 0
    doc = np.searchsorted(cu, ix, side="right") - 1
    pos = ix - cu[doc]
    if causal:
        return int((pos + 1).sum())
    return int((cu[doc + 1] - cu[doc]).sum())


def pad_cu_seqlens(cu_seqlens: np.ndarray, multiple: int) -> np.ndarray:
    """Each document's length rounded up to a multiple of ``multiple`` (Megatron's
    ``cu_seqlens_q_padded`` for context parallelism of cp ranks: multiple = 2 * cp)."""
    cu = _check(cu_seqlens, 1)
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be >= 1")
    lengths = -(-np.diff(cu) // multiple) * multiple
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def with_pad_documents(cu_seqlens: np.ndarray, cu_padded: np.ndarray) -> np.ndarray:
    """The attention documents of a padded packed batch: every real document, then its padding as a
    document of its own (so pad tokens see only pad tokens and no real token sees them).

    cu_seqlens: the real documents' lengths (int [n + 1]); cu_padded: the same documents padded
    (int [n + 1], each length >= the real one). Returns int64 [<= 2n + 1] on the padded positions.
    """
    cu, padded = _check(cu_seqlens, 1), _check(cu_padded, 1)
    if cu.size != padded.size or np.any(np.diff(padded) < np.diff(cu)):
        raise ValueError("cu_seqlens_padded must have one entry per document and no document shorter than its real length")
    ends = padded[:-1] + np.diff(cu)  # where each real document stops inside its padded slot
    return np.unique(np.concatenate([padded, ends])).astype(np.int64)


def megatron_cp_layout(cu_padded: np.ndarray, world: int) -> Layout:
    """Megatron's context-parallel layout of a packed (``thd``) batch over ``world`` ranks.

    Every document of ``cu_padded`` (lengths multiples of 2 * world, see :func:`pad_cu_seqlens`)
    is cut into 2 * world equal chunks and rank r holds chunks r and 2 * world - 1 - r, in that
    order, documents in order: what Megatron's ``_get_thd_freqs_on_this_cp_rank`` (RoPE) and
    TransformerEngine's ``thd_get_partitioned_indices`` assume. The indices are ascending, so a
    rank's local order is Megatron's local order.
    """
    cu = _check(cu_padded, world)
    lengths = np.diff(cu)
    if np.any(lengths % (2 * world)):
        d = int(np.flatnonzero(lengths % (2 * world))[0])
        raise ValueError(f"document {d} has {int(lengths[d])} tokens, not a multiple of 2 x cp = {2 * world}; "
                         "pad every document to a multiple of 2 x cp (cu_seqlens_q_padded)")
    chunk = lengths // (2 * world)
    indices = []
    for r in range(world):
        parts = []
        for start, c in zip(cu[:-1].tolist(), chunk.tolist()):
            if c:
                parts.append(np.arange(start + r * c, start + (r + 1) * c, dtype=np.int64))
                parts.append(np.arange(start + (2 * world - 1 - r) * c, start + (2 * world - r) * c, dtype=np.int64))
        indices.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return Layout("megatron", tuple(indices), int(cu[-1]))
