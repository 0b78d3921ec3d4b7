"""Variable-length steps: each optimizer step is a set of whole documents (``data.mode: varlen``).

    steps = VarlenSteps(store, seq_len=4096, tokens_per_step=65536, seed=1)
    steps.step_lengths(7)           # int64 [n]: the planner's input, no token read
    steps.sequence(7, 3)            # tokens of the step's sequence 3 (one document piece)
    steps.rank_streams(7, 0, 2)     # static SP: the step packed into streams, dp rank 0's share

A document longer than ``seq_len`` (the longest sequence the run accepts) is cut into pieces of
at most ``seq_len`` tokens; each piece is its own document (positions restart, attention does
not cross pieces), as in dataset decomposition. Epoch ``e`` shuffles the pieces with
``SeedSequence([seed, e, 2])`` and deals them out in order: a step takes pieces while their sum
stays within ``tokens_per_step``, so every step is whole pieces and at most ``tokens_per_step``
tokens (the epoch's last step takes what is left). Steps never cross epochs, and everything is a
pure function of (store, seq_len, tokens_per_step, seed, step): any rank computes any step's
lengths, and a resumed run needs only the step number.

Static SP packs a step's sequences into streams of ``seq_len`` by best-fit decreasing (as
``pack`` does), so varlen runs compare across modes; the stream count varies per step, so it is
padded with empty streams to a multiple of dp (an empty stream runs an empty pass).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from seqpar.data.store import TokenStore
from seqpar.data.streams import Stream, best_fit_decreasing, split_pieces

_KEEP_EPOCHS = 2


@dataclass(frozen=True)
class _Epoch:
    """Pieces in dealing order and the step boundaries: step j is pieces bounds[j]:bounds[j+1]."""

    doc: np.ndarray  # int64 [n_pieces]
    start: np.ndarray  # int64 [n_pieces]
    length: np.ndarray  # int64 [n_pieces]
    bounds: np.ndarray  # int64 [n_steps + 1]

    @property
    def num_steps(self) -> int:
        return int(self.bounds.size - 1)


def deal_steps(lengths: np.ndarray, tokens_per_step: int) -> np.ndarray:
    """Step boundaries over pieces in order: each step the longest prefix within ``tokens_per_step``.

    lengths: int64 [n], each in [1, tokens_per_step] -> int64 [steps + 1] (bounds[0] = 0, bounds[-1] = n).
    """
    cum = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    bounds = [0]
    while bounds[-1] < lengths.size:
        i = bounds[-1]
        j = int(np.searchsorted(cum, cum[i] + tokens_per_step, side="right")) - 1
        bounds.append(max(j, i + 1))  # a piece never exceeds tokens_per_step, so j > i anyway
    return np.asarray(bounds, dtype=np.int64)


def empty_stream() -> Stream:
    """A stream of no tokens (an empty pass: the rank takes part in every collective, with no data)."""
    return Stream(tokens=np.zeros(0, dtype=np.int64), cu_seqlens=np.zeros(1, dtype=np.int32))


def pack_sequences(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Sequence ids per stream: best-fit decreasing into streams of ``seq_len`` tokens, streams in
    opening order, ids inside a stream in their step order (pure)."""
    if lengths.size == 0:
        return []
    bins, n = best_fit_decreasing(np.asarray(lengths, dtype=np.int64), int(seq_len))
    return [np.flatnonzero(bins == b).tolist() for b in range(n)]


class VarlenSteps:
    """Random-access variable-length steps over a token store (see the module doc).

    Args:
        store: the token store (or its prefix).
        seq_len: the longest sequence; longer documents are cut into pieces of at most this.
        tokens_per_step: the token budget of one step (>= seq_len).
        seed: non-negative; with the other arguments it fixes every step.
    """

    by_step = True

    def __init__(self, store: TokenStore | str, *, seq_len: int, tokens_per_step: int, seed: int,
                 shuffle: bool = True) -> None:
        if int(seq_len) < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2 (one input and one target token)")
        if int(tokens_per_step) < int(seq_len):
            raise ValueError(f"tokens_per_step={tokens_per_step} must be >= seq_len={seq_len}")
        self.store = TokenStore(store) if isinstance(store, str) else store  # or any store-like view (a blend)
        self.seq_len, self.tokens_per_step, self.seed = int(seq_len), int(tokens_per_step), int(seed)
        self.shuffle = bool(shuffle)  # False: deal in the store's order (a blend orders the documents itself)
        lengths = self.store.doc_lengths
        docs = np.flatnonzero(lengths).astype(np.int64)
        if docs.size == 0:
            raise ValueError(f"token store {self.store.prefix} has no tokens")
        self._pieces = split_pieces(lengths, docs, self.seq_len)
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()
        self._epoch_starts: list[int] = [0]  # global step of each epoch's first step

    # -- the deal ------------------------------------------------------------------------
    def _epoch(self, e: int) -> _Epoch:
        ep = self._epochs.get(e)
        if ep is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, e, 2]))
            perm = rng.permutation(self._pieces[0].size) if self.shuffle else np.arange(self._pieces[0].size)
            doc, start, length = (a[perm] for a in self._pieces)
            ep = self._epochs[e] = _Epoch(doc, start, length, deal_steps(length, self.tokens_per_step))
            while len(self._epochs) > _KEEP_EPOCHS:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(e)
        return ep

    def locate(self, step: int) -> tuple[_Epoch, int]:
        """Global step -> (its epoch, index within the epoch)."""
        step = int(step)
        if step < 0:
            raise IndexError(f"step {step} must be >= 0")
        while self._epoch_starts[-1] <= step:
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + self._epoch(e).num_steps)
        e = bisect.bisect_right(self._epoch_starts, step) - 1
        return self._epoch(e), step - self._epoch_starts[e]

    def _slice(self, step: int) -> tuple[_Epoch, int, int]:
        ep, j = self.locate(step)
        return ep, int(ep.bounds[j]), int(ep.bounds[j + 1])

    # -- access --------------------------------------------------------------------------
    def step_lengths(self, step: int) -> np.ndarray:
        """Lengths of the step's sequences, int64 [n], in the step's order (no token is read)."""
        ep, lo, hi = self._slice(step)
        return ep.length[lo:hi].copy()

    def sequence(self, step: int, i: int) -> np.ndarray:
        """Tokens of the step's sequence ``i``: int64 [step_lengths(step)[i]]."""
        ep, lo, hi = self._slice(step)
        if not 0 <= i < hi - lo:
            raise IndexError(f"sequence {i} is outside step {step}'s {hi - lo} sequences")
        k = lo + int(i)
        s = int(ep.start[k])
        return np.asarray(self.store.span(int(ep.doc[k]), s, s + int(ep.length[k])), dtype=np.int64)

    def stream_of(self, step: int, ids: list[int], sequences: list[np.ndarray] | None = None) -> Stream:
        """The step's sequences ``ids`` packed into one stream, each its own document (from
        ``sequences``, the step's tokens read ahead, when given)."""
        if not ids:
            return empty_stream()
        parts = [self.sequence(step, i) if sequences is None else sequences[i] for i in ids]
        cu = np.zeros(len(parts) + 1, dtype=np.int32)
        np.cumsum([p.size for p in parts], out=cu[1:])
        return Stream(tokens=np.concatenate(parts), cu_seqlens=cu)

    def step_stream_ids(self, step: int, dp: int) -> list[list[int]]:
        """Static SP: the step's sequence ids per stream (best-fit into ``seq_len``), padded with
        empty streams to a multiple of ``dp``."""
        packed = pack_sequences(self.step_lengths(step), self.seq_len)
        return packed + [[] for _ in range(-len(packed) % dp)]

    def rank_streams(self, step: int, dp_rank: int, dp: int) -> list[Stream]:
        """dp rank ``dp_rank``'s streams of ``step`` (static SP); only its share's tokens are read."""
        ids = self.step_stream_ids(step, dp)
        per = len(ids) // dp
        return [self.stream_of(step, s) for s in ids[dp_rank * per:(dp_rank + 1) * per]]

    def describe(self) -> str:
        ep = self._epoch(0)
        n = int(self._pieces[0].size)
        return (f"varlen seq_len={self.seq_len} tokens_per_step={self.tokens_per_step:,} seed={self.seed}: "
                f"{n:,} sequences ({int((self._pieces[2] == self.seq_len).sum()):,} cut at seq_len), "
                f"epoch 0: {ep.num_steps:,} steps of {n / max(ep.num_steps, 1):.1f} sequences on average")
