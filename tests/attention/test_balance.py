"""Causal-work balance of the per-document zigzag layout on real packed data.

Windows of 16K tokens from the embedded corpus (the interpreter's stdlib sources, built once into
``$SEQPAR_CACHE``, which the tests' conftest points at .pytest_cache), packed by both data modes.
For every SP degree P = 2..8 the busiest rank's visible (query, key) pairs must be within 5% of the
mean; the contiguous layout on the same windows shows what an unbalanced layout looks like.

Run: python -m pytest tests/attention/test_balance.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from seqpar.attention.layout import build_layout, causal_work

SEQ_LEN = 16384
TOLERANCE = 0.05  # busiest rank at most 5% above the mean
SCAN = 300  # streams scanned for the most fragmented windows


def _imbalance(cu: np.ndarray, kind: str, world: int) -> float:
    """max / mean of the ranks' causal work (visible pairs whose query is on the rank)."""
    lay = build_layout(cu, kind, ring=world)
    work = np.array([causal_work(lay, cu, r) for r in range(world)], dtype=np.float64)
    lengths = np.diff(cu.astype(np.int64))
    assert work.sum() == (lengths * (lengths + 1) // 2).sum()
    return float(work.max() / work.mean())


@pytest.fixture(scope="module")
def windows() -> dict[str, np.ndarray]:
    """name -> cu_seqlens of a 16K window: the first streams of each mode, and the windows made of
    the most documents among the first SCAN streams (the hardest case for per-document zigzag)."""
    from seqpar.data.corpus import embedded_corpus
    from seqpar.data.streams import PackedStreams

    prefix = embedded_corpus(progress=False)
    out: dict[str, np.ndarray] = {}
    for mode in ("pack", "concat_chunk"):
        streams = PackedStreams(prefix, mode=mode, seq_len=SEQ_LEN, seed=0)
        by_docs = sorted(range(SCAN), key=lambda i: (-streams[i].num_docs, i))
        for i in sorted({0, 1, 2, *by_docs[:4]}):
            s = streams[i]
            assert s.num_tokens > SEQ_LEN - 64 and int(s.cu_seqlens[-1]) == s.num_tokens
            out[f"{mode}[{i}] ({s.num_docs} docs)"] = s.cu_seqlens
    assert any(cu.size - 1 >= 5 for cu in out.values()), "expected some windows packed from several documents"
    return out


@pytest.mark.parametrize("world", range(2, 9))
def test_zigzag_busiest_rank_within_5_percent_of_mean(windows, world):
    ratios = {name: _imbalance(cu, "zigzag", world) for name, cu in windows.items()}
    bad = {name: round(r, 4) for name, r in ratios.items() if r > 1 + TOLERANCE}
    assert not bad, f"P={world}: zigzag max/mean causal work above {1 + TOLERANCE}: {bad}"


def test_contiguous_is_much_worse(windows):
    """The same check fails for contiguous sharding: the balance test can fail."""
    worst = {world: max(_imbalance(cu, "contiguous", world) for cu in windows.values()) for world in range(2, 9)}
    assert all(r > 1 + TOLERANCE for r in worst.values()), worst
    assert max(worst.values()) > 1.5, worst
