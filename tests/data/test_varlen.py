"""Variable-length steps (data.mode=varlen): whole pieces, within the budget, addressed by step."""

import numpy as np
import pytest

from seqpar.data.store import TokenStore
from seqpar.data.varlen import VarlenSteps, deal_steps, pack_sequences


def test_deal_steps_takes_the_longest_prefix_within_the_budget():
    lengths = np.array([5, 3, 4, 8, 1, 2, 7], dtype=np.int64)
    bounds = deal_steps(lengths, 10)
    assert bounds.tolist() == [0, 2, 3, 5, 7]  # 5+3 | 4 (+8 > 10) | 8+1 | 2+7
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert 0 < lengths[lo:hi].sum() <= 10
        if hi < lengths.size:  # the next piece would not have fitted
            assert lengths[lo:hi + 1].sum() > 10


def test_pack_sequences_best_fit_keeps_every_id_once():
    lengths = np.array([6, 2, 5, 3, 4, 1], dtype=np.int64)
    streams = pack_sequences(lengths, 8)
    assert sorted(i for s in streams for i in s) == list(range(6))
    assert all(lengths[s].sum() <= 8 for s in streams)
    assert len(streams) == 3  # 21 tokens need 3 streams of 8
    assert pack_sequences(np.zeros(0, dtype=np.int64), 8) == []


@pytest.fixture(scope="module")
def steps(small_store):
    return VarlenSteps(small_store, seq_len=128, tokens_per_step=1024, seed=3)


def test_steps_are_whole_pieces_within_budget_and_cover_the_epoch(steps, small_store):
    store = TokenStore(small_store)
    ep, _ = steps.locate(0)
    seen = 0
    for t in range(ep.num_steps):
        lengths = steps.step_lengths(t)
        assert lengths.size >= 1 and lengths.max() <= 128 and lengths.sum() <= 1024
        seen += int(lengths.sum())
    assert seen == int(store.doc_lengths.sum())  # every token once per epoch
    # The first step of epoch 1 follows the last of epoch 0 and is a fresh shuffle.
    assert steps.locate(ep.num_steps)[1] == 0


def test_pieces_rebuild_documents_and_are_separate_documents(steps, small_store):
    store = TokenStore(small_store)
    ep, _ = steps.locate(0)
    doc = int(np.argmax(store.doc_lengths))  # a long document: cut into pieces of seq_len
    pieces = sorted((int(s), k) for k, (d, s) in enumerate(zip(ep.doc, ep.start)) if d == doc)
    assert len(pieces) == -(-int(store.doc_lengths[doc]) // 128)
    rebuilt = np.concatenate([store.span(doc, s, s + int(ep.length[k])) for s, k in pieces])
    np.testing.assert_array_equal(rebuilt, store.doc(doc))
    stream = steps.stream_of(0, [0, 1, 2])
    lengths = steps.step_lengths(0)[:3]
    assert stream.cu_seqlens.tolist() == [0, *np.cumsum(lengths).tolist()]  # each its own document
    np.testing.assert_array_equal(stream.tokens[:lengths[0]], steps.sequence(0, 0))


def test_random_access_and_determinism(small_store, steps):
    fresh = VarlenSteps(small_store, seq_len=128, tokens_per_step=1024, seed=3)
    for t in (40, 3, 0, 17):  # any order, a fresh object: a resumed run needs only the step
        np.testing.assert_array_equal(fresh.step_lengths(t), steps.step_lengths(t))
        np.testing.assert_array_equal(fresh.sequence(t, 0), steps.sequence(t, 0))
    other = VarlenSteps(small_store, seq_len=128, tokens_per_step=1024, seed=4)
    assert any(not np.array_equal(other.step_lengths(t), steps.step_lengths(t)) for t in range(5))


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_rank_streams_split_the_step_over_dp_with_empty_padding(steps, dp):
    for t in range(4):
        ids = steps.step_stream_ids(t, dp)
        assert len(ids) % dp == 0
        assert sorted(i for s in ids for i in s) == list(range(steps.step_lengths(t).size))
        got = [s for r in range(dp) for s in steps.rank_streams(t, r, dp)]
        assert len(got) == len(ids)
        assert sum(s.num_tokens for s in got) == int(steps.step_lengths(t).sum())
        assert all(s.num_tokens <= 128 for s in got)


def test_bad_arguments_are_clear(small_store):
    with pytest.raises(ValueError, match="tokens_per_step=64 must be >= seq_len=128"):
        VarlenSteps(small_store, seq_len=128, tokens_per_step=64, seed=0)
    with pytest.raises(IndexError, match="step -1"):
        VarlenSteps(small_store, seq_len=128, tokens_per_step=256, seed=0).step_lengths(-1)
