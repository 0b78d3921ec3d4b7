"""Weighted blends of token stores, Megatron's way: ``data.path: "0.3 data/a 0.7 data/b"``.

    blend = parse_blend("0.3 data/a 0.7 data/b")        # [(0.3, "data/a"), (0.7, "data/b")], weights normalised
    docs = BlendedDocs([a, b], [0.3, 0.7], seed)          # varlen: the documents in largest-deficit order

The next document (or piece) always comes from the store furthest below its share of the tokens so
far (Megatron's ``BlendedDataset`` rule, on tokens), with no randomness, so the realised shares stay
within one document of the weights at every step and a resumed run needs only its position.
``pack`` and ``concat_chunk`` streams of a blend are ``seqpar.data.blend_streams.BlendedStreams``.
"""

from __future__ import annotations

import numpy as np

from seqpar.data.store import DocumentSizes


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
