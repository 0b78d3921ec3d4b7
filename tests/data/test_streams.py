"""PackedStreams: shape rules, document purity, epoch coverage, determinism, random access.

The position store's token ids are their global positions, so every token tells which
document it came from and where: a cu_seqlens piece is pure iff its tokens are consecutive
integers inside one document.
"""

import hashlib

import numpy as np
import pytest

from seqpar.data.store import TokenStore
from seqpar.data.streams import (PackedStreams, Stream, best_fit_decreasing,
                                 concat_chunk_plan, split_pieces)
from tests.data.conftest import SEQ_LEN

CASES = [(m, dm) for m in ("concat_chunk", "pack") for dm in (True, False)]


@pytest.fixture(scope="module")
def store(position_store):
    prefix, docs = position_store
    s = TokenStore(prefix)
    assert s.num_tokens == s.max_token_id() + 1
    return s


def _doc_of(store, tokens):
    return np.searchsorted(store.doc_offsets, tokens, side="right") - 1


def _epoch(ps, epoch):
    start = sum(ps.streams_in_epoch(e) for e in range(epoch))
    return [ps[start + j] for j in range(ps.streams_in_epoch(epoch))]


def _pieces(store, stream, seq_len):
    """Yield each cu_seqlens piece after checking the stream's invariants."""
    cu, tok = stream.cu_seqlens, stream.tokens
    assert tok.dtype == np.int64 and cu.dtype == np.int32
    assert cu[0] == 0 and cu[-1] == tok.size <= seq_len and np.all(np.diff(cu) > 0)
    for a, b in zip(cu[:-1], cu[1:]):
        yield tok[a:b]


@pytest.mark.parametrize("mode,doc_mask", CASES)
def test_streams_valid_and_pure(store, mode, doc_mask):
    ps = PackedStreams(store, mode=mode, seq_len=SEQ_LEN, seed=0, doc_mask=doc_mask)
    for epoch in (0, 1):
        for s in _epoch(ps, epoch):
            if mode == "concat_chunk":
                assert s.num_tokens == SEQ_LEN
            if not doc_mask:
                assert s.cu_seqlens.tolist() == [0, s.num_tokens]
                continue
            for piece in _pieces(store, s, SEQ_LEN):
                assert np.all(np.diff(piece) == 1)  # contiguous run of one document ...
                assert _doc_of(store, piece[:1]) == _doc_of(store, piece[-1:])  # ... only one


@pytest.mark.parametrize("doc_mask", [True, False])
def test_pack_covers_every_token_once(store, doc_mask):
    ps = PackedStreams(store, mode="pack", seq_len=SEQ_LEN, seed=1, doc_mask=doc_mask)
    masked = PackedStreams(store, mode="pack", seq_len=SEQ_LEN, seed=1)
    for epoch in (0, 1, 2):
        streams = _epoch(ps, epoch)
        flat = np.concatenate([s.tokens for s in streams])
        assert np.array_equal(np.sort(flat), np.arange(store.num_tokens))
        # doc_mask only changes cu_seqlens, never which tokens go where.
        assert all(np.array_equal(s.tokens, m.tokens) for s, m in zip(streams, _epoch(masked, epoch)))
        for m in _epoch(masked, epoch):
            for piece in _pieces(store, m, SEQ_LEN):
                # Packing never cuts: a piece starts at a multiple of seq_len in its document
                # and is the whole rest of it when shorter than seq_len.
                d = _doc_of(store, piece[:1])[0]
                off = piece[0] - store.doc_offsets[d]
                assert off % SEQ_LEN == 0
                assert piece.size == min(SEQ_LEN, store.doc_lengths[d] - off)
    # Best fit keeps streams nearly full: a few partial streams per packing window at most.
    assert store.num_tokens / (ps.streams_in_epoch(0) * SEQ_LEN) > 0.9


def test_concat_chunk_covers_concatenation_minus_tail(store):
    ps = PackedStreams(store, mode="concat_chunk", seq_len=SEQ_LEN, seed=2)
    n = store.num_tokens // SEQ_LEN
    orders = []
    for epoch in (0, 1):
        assert ps.streams_in_epoch(epoch) == n
        flat = np.concatenate([s.tokens for s in _epoch(ps, epoch)])
        assert flat.size == n * SEQ_LEN and np.unique(flat).size == flat.size
        # Split the epoch back into document runs: all complete documents, except the last
        # one, which may have lost its end in the dropped tail.
        docs = _doc_of(store, flat)
        cuts = np.flatnonzero((np.diff(docs) != 0) | (np.diff(flat) != 1)) + 1
        runs = np.split(flat, cuts)
        run_docs = [int(_doc_of(store, r[:1])[0]) for r in runs]
        assert len(set(run_docs)) == len(runs)
        for r, d in zip(runs, run_docs):
            assert r[0] == store.doc_offsets[d]
        for r, d in zip(runs[:-1], run_docs[:-1]):
            assert r.size == store.doc_lengths[d]
        dropped = store.num_tokens - flat.size
        unseen = set(range(store.num_docs)) - set(run_docs)
        tail = store.doc_lengths[run_docs[-1]] - runs[-1].size
        assert dropped == tail + sum(store.doc_lengths[d] for d in unseen) < SEQ_LEN
        orders.append(run_docs)
    assert orders[0] != orders[1]  # each epoch has its own document order


@pytest.mark.parametrize("mode,doc_mask", CASES)
def test_determinism_and_random_access(store, mode, doc_mask):
    args = dict(mode=mode, seq_len=SEQ_LEN, seed=7, doc_mask=doc_mask)
    a, b = PackedStreams(store, **args), PackedStreams(store, **args)
    n = a.streams_in_epoch(0) + a.streams_in_epoch(1) + a.streams_in_epoch(2) // 2
    sequential = [a[i] for i in range(n)]  # walks through epochs 0, 1 and into 2
    rng = np.random.default_rng(0)
    for i in rng.permutation(n)[:200]:  # fresh object, jumping between epochs
        assert b[int(i)] == sequential[i]
    assert PackedStreams(store, **args)[n - 1] == sequential[n - 1]  # cold jump far ahead
    assert a.locate(n - 1)[0] == 2
    e0, e1 = a.streams_in_epoch(0), a.streams_in_epoch(1)
    assert [s.tokens[0] for s in sequential[:e0]] != [s.tokens[0] for s in sequential[e0:e0 + e1]]
    other = PackedStreams(store, **{**args, "seed": 8})
    assert any(other[i] != sequential[i] for i in range(10))


def digest(ps, n):
    """sha256 of streams [0, n): used to compare streams across processes."""
    h = hashlib.sha256()
    for i in range(n):
        s = ps[i]
        h.update(s.tokens.tobytes())
        h.update(s.cu_seqlens.tobytes())
    return h.hexdigest()


# Identical streams in freshly spawned interpreters are checked in test_corpus.py, whose
# concurrency test already pays for spawning processes (each imports megatron-core).


def test_errors_and_describe(store):
    with pytest.raises(ValueError, match="'concat_chunk', 'pack'"):
        PackedStreams(store, mode="chunk", seq_len=SEQ_LEN, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        PackedStreams(store, mode="pack", seq_len=1, seed=0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        PackedStreams(store, mode="concat_chunk", seq_len=store.num_tokens + 1, seed=0)
    ps = PackedStreams(store, mode="pack", seq_len=store.num_tokens * 2, seed=0)
    assert ps.streams_in_epoch(0) == 1 and ps[5].num_tokens == store.num_tokens
    with pytest.raises(IndexError):
        ps[-1]
    text = PackedStreams(store.prefix, mode="pack", seq_len=SEQ_LEN, seed=0).describe()
    assert "pack" in text and "streams" in text and "\n" not in text


def test_pure_helpers():
    lengths = np.array([5, 0, 10, 3], dtype=np.int64)
    docs = np.array([0, 2, 3])
    doc, start, length = split_pieces(lengths, docs, 4)
    assert doc.tolist() == [0, 0, 2, 2, 2, 3]
    assert start.tolist() == [0, 4, 0, 4, 8, 0] and length.tolist() == [4, 1, 4, 4, 2, 3]
    bins, n = best_fit_decreasing(np.array([3, 5, 2, 5, 1]), 6)
    assert n == 3  # {5,1}, {5}, {3,2} -- or equivalent: 16 tokens need 3 bins of 6
    assert np.bincount(bins, weights=[3, 5, 2, 5, 1]).max() <= 6
    plan = concat_chunk_plan(lengths, docs, 4, np.random.default_rng(0))
    assert plan.num_streams == 18 // 4 and plan.length.sum() == 16
    assert Stream(np.arange(3), np.array([0, 3], np.int32)) == Stream(np.arange(3),
                                                                      np.array([0, 3], np.int32))
