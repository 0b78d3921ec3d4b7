"""Streams of a weighted blend (``pack`` / ``concat_chunk``), every piece drawn by the largest token deficit.

    streams = BlendedStreams(stores, [0.3, 0.7], mode="pack", seq_len=4096, seed=1234)
    streams[i]            # stream i of the blend (a pure function of i and the arguments)
    streams.shares(n)     # realised token share of each store over the first n streams

Megatron's ``BlendedDataset`` takes the next *sample* from the dataset furthest below its share.
Here the unit is the *piece* (a document, or a seq_len slice of a longer one): streams are filled
one piece at a time, and each piece comes from the store with the largest token deficit
``weight * tokens_so_far - its_tokens`` (ties to the first store). A store's surplus is therefore
never more than one piece, at every piece and so at every stream and step boundary; with two
stores neither is behind by more than one piece either. Pieces never exceed a document, so the
realised shares are exact up to one document at every step.

How a stream is filled, per mode:
- ``concat_chunk``: each store's documents in seeded permutations (a new one per pass over the
  store) are concatenated; a stream takes ``seq_len`` tokens, each piece the rest of the current
  document of the deficit store, cut at the stream's end (the rest continues that store's next
  piece). Streams are exactly ``seq_len`` tokens.
- ``pack``: documents are split into pieces of at most ``seq_len`` that are never cut; each store
  keeps a window of its next ``window`` pieces, and the deficit store gives the largest piece of its
  window that fits the stream's free space (best fit; the oldest among equals). When none fits,
  the stream is closed, so streams hold at most ``seq_len`` tokens.

Random access: streams are built in chunks of ``CHUNK`` streams; the small packer state (per store:
pass, position, window; tokens so far) is kept at every chunk start, so stream ``i`` needs the
chunks before it built once (as ``PackedStreams`` walks its pack epochs) and a resumed run needs
only its position. Only the two most recently used chunks' plans are kept.
"""

from __future__ import annotations

import bisect
import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from seqpar.data.store import TokenStore
from seqpar.data.streams import MODES, Stream

#: Pieces a store offers the best-fit packer at once: enough choice to fill a stream tightly,
#: few enough that each choice is a bisect in a short list.
WINDOW = 256
#: Streams per plan chunk (the unit of random access and of memory).
CHUNK = 1024
_KEY = 1 << 40  # window keys: length * _KEY + (_KEY - 1 - serial), so the largest key fitting is the oldest largest piece
_KEEP = 2


@dataclass
class _Feed:
    """One store's reading position: pass p's permutation of its non-empty documents, the document
    at ``pos``, ``offset`` tokens of it already given out; and (pack) the window of pending pieces."""

    passes: int = 0
    pos: int = 0
    offset: int = 0
    serial: int = 0  # pieces read so far (orders the window)
    keys: list[int] = field(default_factory=list)  # sorted window keys
    pieces: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # key -> (doc, start, length)


@dataclass
class _State:
    """The packer between streams: one feed per store and the tokens each has given."""

    feeds: list[_Feed]
    tokens: list[int]


@dataclass
class _Chunk:
    """CHUNK streams: stream s is pieces ptr[s]:ptr[s+1], each (store, doc, start, length)."""

    ptr: np.ndarray  # int64 [CHUNK + 1]
    store: np.ndarray  # int64 [n_pieces]
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    tokens_before: np.ndarray  # int64 [n_stores]: tokens per store before the chunk


class BlendedStreams:
    """Random-access, infinitely repeating streams of a blend of token stores (module doc).

    Args:
        stores: the token stores; they must share a tokenizer (checked by the caller).
        weights: positive, one per store (normalised here).
        mode: ``"pack"`` or ``"concat_chunk"``.
        seq_len: tokens per stream (exact for concat_chunk, at most for pack); >= 2.
        seed: non-negative int; with the other arguments it fixes every stream.
        doc_mask: pieces as separate attention documents (True) or one per stream (False).
        names: store names for the printed shares (default: their prefixes).
    """

    def __init__(self, stores: list[TokenStore], weights: list[float], *, mode: str, seq_len: int, seed: int,
                 doc_mask: bool = True, names: list[str] | None = None, window: int = WINDOW) -> None:
        if mode not in MODES:
            raise ValueError(f"data mode {mode!r} is not one of {list(MODES)}")
        if not stores or len(stores) != len(weights):
            raise ValueError(f"a blend needs one weight per store (got {len(stores)} stores, {len(weights)} weights)")
        if int(seq_len) < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2 (one input and one target token)")
        self.stores = stores
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self._w = self.weights.tolist()
        self.mode, self.seq_len, self.seed, self.doc_mask = mode, int(seq_len), int(seed), bool(doc_mask)
        self.window = int(window)
        self.names = names or [s.prefix for s in stores]
        self._nonempty = []
        for s in stores:
            docs = np.flatnonzero(s.doc_lengths).astype(np.int64)
            if docs.size == 0:
                raise ValueError(f"token store {s.prefix} has no tokens")
            self._nonempty.append(docs)
        self._lengths = [s.doc_lengths for s in stores]
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._states = [_State([_Feed() for _ in stores], [0] * len(stores))]  # state at each chunk start
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()

    # -- the packer ------------------------------------------------------------------------
    def _order(self, k: int, p: int) -> np.ndarray:
        """Store k's documents in pass p: a seeded permutation of its non-empty documents."""
        order = self._orders.get((k, p))
        if order is None:
            if len(self._orders) > 4 * len(self.stores):
                self._orders.clear()
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, k, p, 11]))
            order = self._orders[(k, p)] = rng.permutation(self._nonempty[k])
        return order

    def _read(self, k: int, feed: _Feed, most: int) -> tuple[int, int, int]:
        """The next piece of store k's concatenation, at most ``most`` tokens: (doc, start, length)."""
        order = self._order(k, feed.passes)
        doc = int(order[feed.pos])
        n = int(self._lengths[k][doc])
        start = feed.offset
        length = min(most, n - start)
        feed.offset += length
        if feed.offset == n:
            feed.pos, feed.offset = feed.pos + 1, 0
            if feed.pos == order.size:
                feed.passes, feed.pos = feed.passes + 1, 0
        return doc, start, length

    def _take(self, k: int, feed: _Feed, free: int) -> tuple[int, int, int] | None:
        """Store k's next piece for a stream with ``free`` tokens of room, or None (pack: none fits)."""
        if self.mode == "concat_chunk":
            return self._read(k, feed, free)
        while len(feed.keys) < self.window:  # refill the window in reading order
            doc, start, length = self._read(k, feed, self.seq_len)
            key = length * _KEY + (_KEY - 1 - feed.serial)
            feed.serial += 1
            bisect.insort(feed.keys, key)
            feed.pieces[key] = (doc, start, length)
        j = bisect.bisect_right(feed.keys, free * _KEY + _KEY - 1) - 1
        if j < 0:
            return None
        return feed.pieces.pop(feed.keys.pop(j))

    def _build(self, c: int) -> _Chunk:
        """Chunk c from the state at its start; records the state at its end."""
        state = copy.deepcopy(self._states[c])
        before = np.asarray(state.tokens, dtype=np.int64)
        w, tokens, n_stores = self._w, state.tokens, len(self.stores)
        ptr, store, doc, start, length = [0], [], [], [], []
        for _ in range(CHUNK):
            free = self.seq_len
            while free > 0:
                total = sum(tokens)
                k = max(range(n_stores), key=lambda i: w[i] * total - tokens[i])  # ties: the first
                piece = self._take(k, state.feeds[k], free)
                if piece is None:
                    break  # pack: the deficit store has nothing that fits; close the stream
                store.append(k)
                doc.append(piece[0])
                start.append(piece[1])
                length.append(piece[2])
                tokens[k] += piece[2]
                free -= piece[2]
            ptr.append(len(store))
        if len(self._states) == c + 1:
            self._states.append(state)
        as_array = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return _Chunk(as_array(ptr), as_array(store), as_array(doc), as_array(start), as_array(length), before)

    def _chunk(self, c: int) -> _Chunk:
        chunk = self._chunks.get(c)
        if chunk is not None:
            self._chunks.move_to_end(c)
            return chunk
        for earlier in range(len(self._states) - 1, c):  # states of the chunks before c
            self._build(earlier)
        chunk = self._chunks[c] = self._build(c)
        while len(self._chunks) > _KEEP:
            self._chunks.popitem(last=False)
        return chunk

    # -- access --------------------------------------------------------------------------
    def pieces(self, i: int) -> list[tuple[int, int, int, int]]:
        """Stream ``i``'s pieces: (store, document, start, length) each."""
        if int(i) < 0:
            raise IndexError(f"stream index {i} must be >= 0")
        ch = self._chunk(int(i) // CHUNK)
        j = int(i) % CHUNK
        lo, hi = int(ch.ptr[j]), int(ch.ptr[j + 1])
        return list(zip(ch.store[lo:hi].tolist(), ch.doc[lo:hi].tolist(), ch.start[lo:hi].tolist(),
                        ch.length[lo:hi].tolist()))

    def __getitem__(self, i: int) -> Stream:
        """Stream ``i``: tokens int64 [T <= seq_len], cu_seqlens int32 [n + 1]."""
        pieces = self.pieces(i)
        bounds = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([p[3] for p in pieces], out=bounds[1:])
        tokens = np.empty(int(bounds[-1]), dtype=np.int64)
        for m, (k, d, s, n) in enumerate(pieces):
            tokens[bounds[m]:bounds[m + 1]] = self.stores[k].span(d, s, s + n)
        cu = bounds if self.doc_mask else bounds[[0, -1]]
        return Stream(tokens=tokens, cu_seqlens=cu.astype(np.int32))

    def stream_tokens(self, i: int) -> int:
        """Tokens in stream ``i`` (from the plan: nothing is read)."""
        return sum(p[3] for p in self.pieces(i))

    def tokens_after(self, n: int) -> np.ndarray:
        """int64 [n_stores]: tokens each store has given in the first ``n`` streams."""
        if n <= 0:
            return np.zeros(len(self.stores), dtype=np.int64)
        ch = self._chunk((n - 1) // CHUNK)
        hi = int(ch.ptr[(n - 1) % CHUNK + 1])
        return ch.tokens_before + np.bincount(ch.store[:hi], weights=ch.length[:hi],
                                              minlength=len(self.stores)).astype(np.int64)

    def shares(self, n: int) -> np.ndarray:
        """Realised token share of each store over the first ``n`` streams."""
        tokens = self.tokens_after(n).astype(np.float64)
        return tokens / max(1.0, float(tokens.sum()))

    def shares_line(self, streams: int) -> str:
        """Each store's weight and its realised token share over the first ``streams`` streams."""
        shares = self.shares(streams)
        items = ", ".join(f"{w:.4f} -> {got:.4f} {name}" for w, got, name in zip(self.weights, shares, self.names))
        fill = self.tokens_after(streams).sum() / max(1, streams * self.seq_len)
        return (f"blend of {len(self.stores)} stores, weight -> realised token share over the run's {streams:,} "
                f"streams ({fill:.1%} fill): {items}")

    def describe(self) -> str:
        """One line: how the streams are made."""
        return (f"{self.mode} seq_len={self.seq_len} seed={self.seed} over a blend; each piece from the store "
                f"with the largest token deficit")
