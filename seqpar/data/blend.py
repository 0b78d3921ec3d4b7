"""Weighted blends of token stores, Megatron's way: ``data.path: "0.3 data/a 0.7 data/b"``.

    blend = parse_blend("0.3 data/a 0.7 data/b")        # [(0.3, "data/a"), (0.7, "data/b")], weights normalised
    streams = BlendedStreams([(0.3, PackedStreams(a, ...)), (0.7, PackedStreams(b, ...))])
    streams[i]                                          # stream i of the blend

Each store is packed on its own (``pack`` or ``concat_chunk``, its own seeded epochs), and the
blend decides which store gives the next stream by Megatron's largest-deficit rule on tokens: the
store furthest below its share of the tokens so far (weight x tokens - its tokens; ties to the
first). So after every stream each store's realised token share is within one stream (seq_len
tokens) of its weight, with no randomness; stream ``i`` depends only on ``i``, and a resumed run
needs only its position. For ``concat_chunk`` (streams of exactly seq_len tokens) this is
Megatron's ``BlendedDataset`` rule on samples.
"""

from __future__ import annotations

import numpy as np

from seqpar.data.store import DocumentSizes
from seqpar.data.streams import PackedStreams, Stream


class BlendError(ValueError):
    """A malformed blend; one line naming ``data.path``."""


def parse_blend(spec: str) -> list[tuple[float, str]] | None:
    """``"0.3 data/a 0.7 data/b"`` -> [(0.3, "data/a"), (0.7, "data/b")] with weights summing to 1;
    None for a plain path (one store)."""
    parts = spec.split()
    if len(parts) < 2:
        return None
    try:
        float(parts[0])
    except ValueError:
        return None  # a path with spaces is not a blend
    if len(parts) % 2:
        raise BlendError(f"data.path={spec!r}: a blend alternates weights and paths ('0.3 data/a 0.7 data/b')")
    pairs = []
    for w, path in zip(parts[::2], parts[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise BlendError(f"data.path={spec!r}: {w!r} is not a weight (a blend is 'WEIGHT PATH WEIGHT PATH ...')") from None
        if not weight > 0:
            raise BlendError(f"data.path={spec!r}: weight {w} of {path} must be positive")
        pairs.append((weight, path))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def blend_from_list(items: list) -> str:
    """A YAML list of ``{weight, path}`` as the Megatron string (what ``data.path`` holds)."""
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"weight", "path"}:
            raise BlendError(f"data.path[{k}]={item!r} must be a mapping with exactly the keys weight and path")
        path = str(item["path"])
        if any(c.isspace() for c in path):
            raise BlendError(f"data.path[{k}].path={path!r} must not contain spaces")
        out += [str(item["weight"]), path]
    return " ".join(out)


class BlendedStreams:
    """Streams drawn from several ``PackedStreams`` by the largest token deficit (module doc)."""

    def __init__(self, parts: list[tuple[float, PackedStreams]], names: list[str] | None = None) -> None:
        if not parts:
            raise BlendError("a blend needs at least one store")
        self.weights = np.asarray([w for w, _ in parts], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.parts = [p for _, p in parts]
        self.names = names or [p.store.prefix for p in self.parts]
        self._which: list[int] = []  # blend stream -> part
        self._local: list[int] = []  # blend stream -> the part's stream index
        self._len: list[int] = []  # blend stream -> its tokens
        self._tokens = np.zeros(len(self.parts), dtype=np.int64)  # tokens drawn per part so far
        self._next = [0] * len(self.parts)
        self.seq_len = self.parts[0].seq_len

    def _extend(self, n: int) -> None:
        """Decide streams up to index n - 1 (forward only; each decision is O(parts))."""
        while len(self._which) < n:
            total = int(self._tokens.sum())
            deficit = self.weights * total - self._tokens
            k = int(np.argmax(deficit))  # ties: the first
            j = self._next[k]
            n_tokens = self.parts[k].stream_tokens(j)
            self._which.append(k)
            self._local.append(j)
            self._len.append(n_tokens)
            self._tokens[k] += n_tokens
            self._next[k] = j + 1

    def source_of(self, i: int) -> tuple[int, int]:
        """Blend stream ``i`` -> (part, that part's stream index)."""
        self._extend(i + 1)
        return self._which[i], self._local[i]

    def shares(self, n: int) -> np.ndarray:
        """Realised token share of each part over the first ``n`` streams."""
        self._extend(n)
        tokens = np.bincount(np.asarray(self._which[:n], dtype=np.int64), weights=np.asarray(self._len[:n], dtype=np.float64),
                             minlength=len(self.parts))
        return tokens / max(1.0, float(tokens.sum()))

    def __getitem__(self, i: int) -> Stream:
        k, j = self.source_of(int(i))
        return self.parts[k][j]

    def shares_line(self, streams: int) -> str:
        """Each store's weight and its realised token share over the first ``streams`` streams."""
        shares = self.shares(streams)
        items = ", ".join(f"{w:.4f} -> {got:.4f} {name}" for w, got, name in zip(self.weights, shares, self.names))
        return f"blend of {len(self.parts)} stores, weight -> realised token share over the run's {streams:,} streams: {items}"

    def describe(self) -> str:
        """One line: how the streams are made."""
        return (f"{self.parts[0].mode} seq_len={self.seq_len} seed={self.parts[0].seed} per store; each stream from the "
                f"store with the largest token deficit")


class BlendedDocs(DocumentSizes):
    """A read-only store view for ``data.mode: varlen``: the documents of several stores in the order
    of the largest token deficit (the next document comes from the store furthest below its share
    of the tokens so far), so that dealing them in order (``VarlenSteps(..., shuffle=False)``)
    keeps every step boundary's realised shares within one document of the weights. Each store's
    documents come in seeded permutations, a new one each time the store is used up; the view ends
    when every store has given its share of max_i(tokens_i / weight_i) tokens, so the store with the
    most tokens for its weight is read once and the others repeat."""

    def __init__(self, stores: list, weights: list[float], seed: int) -> None:
        self.stores = stores
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.prefix = " + ".join(s.prefix for s in stores)
        sizes = np.asarray([s.num_tokens for s in stores], dtype=np.float64)
        if (sizes == 0).any():
            raise BlendError(f"data.path blend: {stores[int(np.argmin(sizes))].prefix} has no tokens")
        target = float(np.max(sizes / self.weights))
        orders = [self._permutation(k, 0, seed) for k in range(len(stores))]
        cursor, passes = [0] * len(stores), [0] * len(stores)
        tokens = np.zeros(len(stores), dtype=np.float64)
        which, docs, lengths = [], [], []
        while tokens.sum() < target:
            k = int(np.argmax(self.weights * tokens.sum() - tokens))
            if cursor[k] == orders[k].size:  # this store is used up: a new permutation
                passes[k] += 1
                orders[k], cursor[k] = self._permutation(k, passes[k], seed), 0
            d = int(orders[k][cursor[k]])
            cursor[k] += 1
            n = int(stores[k].doc_lengths[d])
            which.append(k)
            docs.append(d)
            lengths.append(n)
            tokens[k] += n
        self._which = np.asarray(which, dtype=np.int64)
        self._docs = np.asarray(docs, dtype=np.int64)
        self._doc_lengths = np.asarray(lengths, dtype=np.int64)

    def _permutation(self, k: int, p: int, seed: int) -> np.ndarray:
        nonempty = np.flatnonzero(self.stores[k].doc_lengths)
        return np.random.default_rng(np.random.SeedSequence([seed, k, p, 7])).permutation(nonempty)

    def store_of(self, i: int) -> tuple[int, int]:
        """Document ``i`` of the view -> (store, its document)."""
        return int(self._which[i]), int(self._docs[i])

    def span(self, i: int, start: int, stop: int) -> np.ndarray:
        k, d = self.store_of(i)
        return self.stores[k].span(d, start, stop)

    def doc(self, i: int) -> np.ndarray:
        k, d = self.store_of(i)
        return self.stores[k].doc(d)

    def max_token_id(self) -> int:
        return max(s.max_token_id() for s in self.stores)

    def shares_line(self) -> str:
        tokens = np.bincount(self._which, weights=self._doc_lengths.astype(np.float64), minlength=len(self.stores))
        items = ", ".join(f"{w:.4f} -> {t / tokens.sum():.4f} {s.prefix}" for w, t, s in zip(self.weights, tokens, self.stores))
        return (f"blend of {len(self.stores)} stores by document, weight -> realised token share over one pass of "
                f"{int(tokens.sum()):,} tokens: {items}")
