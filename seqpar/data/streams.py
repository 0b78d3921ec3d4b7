"""Deterministic, random-access packing of a token store into streams (micro-batches).

A *stream* is one packed run of at most ``seq_len`` tokens plus ``cu_seqlens`` marking its
document pieces. ``PackedStreams(store, ...)[i]`` is a pure function of
(store, mode, seq_len, seed, doc_mask, i): any process computes the same stream for the
same index, so the trainer resumes by remembering how many streams it consumed.

Epochs repeat forever. Epoch ``e`` shuffles with ``SeedSequence([seed, e])`` and has its own
plan: a CSR table of pieces (document, start, length) per stream, built with numpy in well
under a second for ~30M tokens. Only the two most recently used plans are kept.

Modes:
- ``concat_chunk`` (baseline): shuffled documents concatenated and cut into windows of
  exactly ``seq_len`` tokens; the epoch's last partial window is dropped.
- ``pack`` (document-aware best fit): documents longer than ``seq_len`` are split into pieces
  of ``seq_len`` (plus a shorter remainder); pieces are packed, never cut, by best-fit
  decreasing within windows of ``PACK_WINDOW`` shuffled pieces; every token appears exactly
  once per epoch; streams are then shuffled.

With ``doc_mask=True`` every piece is its own attention document; with ``doc_mask=False`` the
whole stream is one (``cu_seqlens = [0, T]``), i.e. classic cross-document attention.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from seqpar.data.store import TokenStore

MODES: tuple[str, ...] = ("concat_chunk", "pack")
#: Pieces packed together by best-fit decreasing: large enough for ~full streams, small
#: enough that packing stays fast and does not sort the whole epoch by length.
PACK_WINDOW = 4096
_KEEP_PLANS = 2  # current epoch and the next (or previous) one


@dataclass(eq=False)
class Stream:
    """One micro-batch."""

    tokens: np.ndarray  # int64 [T], T <= seq_len
    cu_seqlens: np.ndarray  # int32 [n + 1], cu_seqlens[0] = 0, cu_seqlens[-1] = T

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def num_docs(self) -> int:
        return int(self.cu_seqlens.size - 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Stream):
            return NotImplemented
        return (np.array_equal(self.tokens, other.tokens)
                and np.array_equal(self.cu_seqlens, other.cu_seqlens))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays


@dataclass
class _Plan:
    """One epoch: stream s is pieces ptr[s]:ptr[s+1], each (doc, start, length)."""

    ptr: np.ndarray  # int64 [n_streams + 1]
    doc: np.ndarray  # int64 [n_pieces]
    start: np.ndarray  # int64 [n_pieces], token offset inside the document
    length: np.ndarray  # int64 [n_pieces], > 0

    @property
    def num_streams(self) -> int:
        return int(self.ptr.size - 1)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch]))


def concat_chunk_plan(lengths: np.ndarray, docs: np.ndarray, seq_len: int,
                      rng: np.random.Generator) -> _Plan:
    """Shuffle documents, concatenate, cut into full windows of ``seq_len`` (tail dropped).

    Args:
        lengths: int64 [num_docs] tokens per document of the store.
        docs: int64 [k] ids of the non-empty documents to use.
    """
    order = rng.permutation(docs)
    cum = np.zeros(order.size + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=cum[1:])
    n = int(cum[-1]) // seq_len
    end = n * seq_len
    # Piece boundaries are document starts and window starts; documents are non-empty, so
    # cum is strictly increasing and each piece lies in one document and one window.
    starts = np.union1d(cum[cum < end], np.arange(0, end, seq_len, dtype=np.int64))
    stops = np.append(starts[1:], end)
    pos = np.searchsorted(cum, starts, side="right") - 1
    stream = starts // seq_len
    ptr = np.searchsorted(stream, np.arange(n + 1), side="left").astype(np.int64)
    return _Plan(ptr=ptr, doc=order[pos], start=starts - cum[pos], length=stops - starts)


def split_pieces(lengths: np.ndarray, docs: np.ndarray, seq_len: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split documents into pieces of ``seq_len`` tokens plus a shorter remainder.

    Returns (doc, start, length), each int64 [n_pieces], in document order.
    """
    lens = lengths[docs]
    counts = -(-lens // seq_len)  # ceil
    doc = np.repeat(docs, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(doc.size, dtype=np.int64) - first) * seq_len
    length = np.minimum(seq_len, np.repeat(lens, counts) - start)
    return doc, start, length


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Assign items to bins of ``capacity``: largest first, each into the fullest bin it fits.

    Args:
        sizes: int64 [k], each in [1, capacity].
    Returns:
        (bins, n_bins): bin id per item (int64 [k], numbered in opening order) and the
        number of bins used. Ties keep input order, so a shuffled input gives a random packing.
    """
    order = np.argsort(-sizes, kind="stable")
    bins = np.empty(sizes.size, dtype=np.int64)
    # Open bins as sorted ints (remaining << 32 | bin): bisect finds the tightest fit.
    open_keys: list[int] = []
    n_bins = 0
    for k, size in zip(order.tolist(), sizes[order].tolist()):
        j = bisect.bisect_left(open_keys, size << 32)
        if j < len(open_keys):
            key = open_keys.pop(j)
            b, remaining = key & 0xFFFFFFFF, (key >> 32) - size
        else:
            b, remaining = n_bins, capacity - size
            n_bins += 1
        bins[k] = b
        if remaining > 0:
            bisect.insort(open_keys, (remaining << 32) | b)
    return bins, n_bins


def pack_plan(pieces: tuple[np.ndarray, np.ndarray, np.ndarray], seq_len: int,
              rng: np.random.Generator, window: int = PACK_WINDOW) -> _Plan:
    """Shuffle pieces, pack them with best-fit decreasing per window, shuffle the streams."""
    doc, start, length = pieces
    perm = rng.permutation(length.size)
    # Full pieces fill a stream alone; only the shorter ones need the Python packing loop,
    # so its cost scales with the number of documents, not tokens / seq_len.
    full = perm[length[perm] == seq_len]
    part = perm[length[perm] < seq_len]
    piece_bin = np.empty(length.size, dtype=np.int64)
    piece_bin[full] = np.arange(full.size)
    n_bins = full.size
    for w in range(0, part.size, window):
        win = part[w:w + window]
        bins, used = best_fit_decreasing(length[win], seq_len)
        piece_bin[win] = bins + n_bins
        n_bins += used
    # Shuffle streams; inside a stream keep the shuffled piece order.
    stream_of_bin = rng.permutation(n_bins)
    rank = np.empty(length.size, dtype=np.int64)
    rank[perm] = np.arange(perm.size)
    stream = stream_of_bin[piece_bin]
    sel = np.lexsort((rank, stream))
    ptr = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(stream, minlength=n_bins), out=ptr[1:])
    return _Plan(ptr=ptr, doc=doc[sel], start=start[sel], length=length[sel])


class PackedStreams:
    """Random-access, infinitely repeating streams over a token store.

    Args:
        store: the token store (or its prefix).
        mode: ``"concat_chunk"`` or ``"pack"`` (see the module docstring).
        seq_len: tokens per stream (exact for concat_chunk, at most for pack); >= 2.
        seed: non-negative int; with the other arguments it fixes every stream.
        doc_mask: pieces as separate attention documents (True) or one per stream (False).
    """

    def __init__(self, store: TokenStore | str, *, mode: str, seq_len: int, seed: int,
                 doc_mask: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"data mode {mode!r} is not one of {list(MODES)}")
        if int(seq_len) < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2 (one input and one target token)")
        if int(seed) < 0:
            raise ValueError(f"seed={seed} must be a non-negative integer")
        self.store = store if isinstance(store, TokenStore) else TokenStore(store)
        self.mode, self.seq_len, self.seed = mode, int(seq_len), int(seed)
        self.doc_mask = bool(doc_mask)
        lengths = self.store.doc_lengths
        self._docs = np.flatnonzero(lengths).astype(np.int64)  # empty documents carry nothing
        self._tokens = int(lengths.sum())
        if self._docs.size == 0:
            raise ValueError(f"token store {self.store.prefix} has no tokens")
        if mode == "concat_chunk" and self._tokens < self.seq_len:
            raise ValueError(f"token store {self.store.prefix} has {self._tokens} tokens, fewer "
                             f"than seq_len={self.seq_len}: lower seq_len or use mode='pack'")
        self._pieces = (split_pieces(lengths, self._docs, self.seq_len)
                        if mode == "pack" else None)
        self._plans: OrderedDict[int, _Plan] = OrderedDict()
        self._epoch_starts: list[int] = [0]  # global index of each epoch's first stream

    # -- plans ---------------------------------------------------------------------------
    def _plan(self, epoch: int) -> _Plan:
        plan = self._plans.get(epoch)
        if plan is not None:
            self._plans.move_to_end(epoch)
            return plan
        rng = _epoch_rng(self.seed, epoch)
        if self.mode == "concat_chunk":
            plan = concat_chunk_plan(self.store.doc_lengths, self._docs, self.seq_len, rng)
        else:
            plan = pack_plan(self._pieces, self.seq_len, rng)
        self._plans[epoch] = plan
        while len(self._plans) > _KEEP_PLANS:
            self._plans.popitem(last=False)
        return plan

    def streams_in_epoch(self, epoch: int) -> int:
        """Number of streams in ``epoch`` (constant for concat_chunk, varies a little for pack)."""
        if epoch < 0:
            raise IndexError(f"epoch {epoch} must be >= 0")
        if self.mode == "concat_chunk":
            return self._tokens // self.seq_len
        return self._plan(epoch).num_streams

    def locate(self, i: int) -> tuple[int, int]:
        """Global stream index -> (epoch, index within the epoch)."""
        i = int(i)
        if i < 0:
            raise IndexError(f"stream index {i} must be >= 0")
        if self.mode == "concat_chunk":
            return divmod(i, self._tokens // self.seq_len)
        # pack: epoch sizes differ, so walk forward, remembering only the counts.
        while self._epoch_starts[-1] <= i:
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + self.streams_in_epoch(e))
        e = bisect.bisect_right(self._epoch_starts, i) - 1
        return e, i - self._epoch_starts[e]

    # -- access --------------------------------------------------------------------------
    def stream_tokens(self, i: int) -> int:
        """Tokens in stream ``i`` (from the plan: nothing is read)."""
        if self.mode == "concat_chunk":
            return self.seq_len
        epoch, j = self.locate(i)
        plan = self._plan(epoch)
        return int(plan.length[int(plan.ptr[j]):int(plan.ptr[j + 1])].sum())

    def __getitem__(self, i: int) -> Stream:
        """Stream ``i`` (any i >= 0): tokens int64 [T <= seq_len], cu_seqlens int32 [n + 1]."""
        epoch, j = self.locate(i)
        plan = self._plan(epoch)
        lo, hi = int(plan.ptr[j]), int(plan.ptr[j + 1])
        lens = plan.length[lo:hi]
        bounds = np.zeros(lens.size + 1, dtype=np.int64)
        np.cumsum(lens, out=bounds[1:])
        tokens = np.empty(int(bounds[-1]), dtype=np.int64)
        for k in range(lens.size):
            s = int(plan.start[lo + k])
            tokens[bounds[k]:bounds[k + 1]] = self.store.span(int(plan.doc[lo + k]), s,
                                                              s + int(lens[k]))
        cu = bounds if self.doc_mask else bounds[[0, -1]]
        return Stream(tokens=tokens, cu_seqlens=cu.astype(np.int32))

    def describe(self) -> str:
        """One line: mode, sizes, and epoch 0's stream count and token efficiency."""
        n = self.streams_in_epoch(0)
        if self.mode == "concat_chunk":
            eff = f"{n * self.seq_len / self._tokens:.1%} of tokens kept"
        else:
            eff = f"{self._tokens / (n * self.seq_len):.1%} fill"
        return (f"{self.mode} seq_len={self.seq_len} seed={self.seed} "
                f"doc_mask={'on' if self.doc_mask else 'off'}: {self._docs.size} docs, "
                f"{self._tokens:,} tokens; epoch 0: {n:,} streams, "
                f"{eff}")

    def __repr__(self) -> str:
        return (f"PackedStreams({self.store.prefix!r}, mode={self.mode!r}, "
                f"seq_len={self.seq_len}, seed={self.seed}, doc_mask={self.doc_mask})")
