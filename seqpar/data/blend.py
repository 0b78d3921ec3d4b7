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
