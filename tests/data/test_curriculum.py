"""Curriculum sampler: odds, both sampling rules, cycles, epochs, resume, constant targets."""

import numpy as np
import pytest

from seqpar.data.curriculum import (CURRICULA, DecomposedBatches, bucket_schedule,
                                    curriculum_odds, plan_schedule)
from seqpar.data.decompose import decompose_store

KS = list(range(8, 14))
HUGE = 10**12  # pieces per bucket: no bucket runs out within the test's steps


def _chi2(counts, probs):
    expected = np.asarray(probs, dtype=np.float64) / np.sum(probs) * np.sum(counts)
    return float(((np.asarray(counts) - expected) ** 2 / expected).sum())


def _counts(schedule):
    return np.bincount(np.asarray(schedule) - KS[0], minlength=len(KS))


# chi-square with 5 degrees of freedom: P(X > 25.7) = 1e-4
CHI2_BOUND = 25.7


def test_named_curricula_generalise():
    for name, odds in CURRICULA.items():
        assert curriculum_odds(name, 6) == odds
    assert curriculum_odds("grow_p2", 3) == [4, 2, 1]
    assert curriculum_odds("grow_linear", 4) == [4, 3, 2, 1]
    assert curriculum_odds("uniform", 2) == [1, 1]
    assert curriculum_odds([1, 0, 2], 3) == [1.0, 0.0, 2.0]
    for bad in ("nope", [1, 2], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="curriculum"):
            curriculum_odds(bad, 3)


@pytest.mark.parametrize("name", ["uniform", "grow_linear", "grow_p2"])
def test_paper_rule_frequencies_match_odds(name):
    odds = CURRICULA[name]
    sched = bucket_schedule({k: HUGE for k in KS}, 13, 1, 6000, odds=odds, rule="paper", seed=7)
    counts = _counts(sched)
    assert _chi2(counts, odds) < CHI2_BOUND, counts
    wrong = [1, 1, 1, 1, 1, 2] if name == "uniform" else [1] * 6
    assert _chi2(counts, wrong) > 4 * CHI2_BOUND  # the test can tell distributions apart


def test_released_rule_weights_by_token_share():
    odds = CURRICULA["grow_p2"]
    pieces = {k: HUGE * (k - 6) >> (k - 8) for k in KS}  # unequal token shares
    sched = bucket_schedule(pieces, 13, 1, 6000, odds=odds, rule="released", seed=3)
    expected = [o * pieces[k] * 2**k for o, k in zip(odds, KS)]
    counts = _counts(sched)
    assert _chi2(counts, expected) < CHI2_BOUND, counts
    assert _chi2(counts, odds) > 4 * CHI2_BOUND


@pytest.mark.parametrize("rule", ["paper", "released"])
def test_epoch_uses_every_full_batch_once(rule):
    pieces = {8: 1000, 9: 333, 10: 250, 11: 77, 12: 40, 13: 9}
    batches = {k: n // (2 * 2 ** (13 - k)) for k, n in pieces.items()}  # base_batch 2
    per_epoch = sum(batches.values())
    s = plan_schedule(pieces, 13, 2, 2 * per_epoch + 5, odds=CURRICULA["grow_p2"], rule=rule,
                      seed=1)
    for e in (0, 1):
        mask = s.epoch == e
        assert mask.sum() == per_epoch
        assert dict(zip(KS, _counts(s.bucket[mask]).tolist())) == batches
    assert not np.array_equal(s.bucket[:per_epoch], s.bucket[per_epoch:2 * per_epoch])
    # offsets of one bucket in one epoch tile its permutation without overlap
    sel = (s.epoch == 0) & (s.bucket == 9)
    assert sorted(s.offset[sel].tolist()) == [i * 32 for i in range(batches[9])]


def test_cycles_make_a_sawtooth():
    pieces = {k: 64 * 2 ** (13 - k) for k in KS}  # equal tokens: 64 steps per bucket
    cycles = 4
    s = plan_schedule(pieces, 13, 1, 6 * 64, odds=CURRICULA["grow_p2"], cycles=cycles, seed=0)
    assert np.all(s.epoch == 0) and np.all(np.diff(s.cycle) >= 0)
    for c in range(cycles):
        ks = s.bucket[s.cycle == c]
        assert np.array_equal(_counts(ks), [16] * 6)  # each cycle: 1/cycles of every bucket
        third = ks.size // 3
        assert ks[:third].mean() + 1.5 < ks[-third:].mean()  # short first, long last
    # the sequence length falls at every cycle start: the sawtooth
    means = [s.bucket[s.cycle == c] for c in range(cycles)]
    for a, b in zip(means[:-1], means[1:]):
        assert a[-8:].mean() > b[:8].mean() + 1.5


def test_schedule_is_deterministic_and_prefix_stable():
    pieces = {8: 500, 9: 300, 10: 100, 11: 60, 12: 20, 13: 12}
    kw = dict(odds=[1, 2, 3, 4, 5, 6], rule="released", cycles=2)
    long = bucket_schedule(pieces, 13, 1, 400, seed=5, **kw)
    assert bucket_schedule(pieces, 13, 1, 400, seed=5, **kw) == long
    assert bucket_schedule(pieces, 13, 1, 123, seed=5, **kw) == long[:123]
    assert bucket_schedule(pieces, 13, 1, 400, seed=6, **kw) != long


def test_schedule_errors():
    with pytest.raises(ValueError, match="lower base_batch"):
        bucket_schedule({8: 10, 9: 10}, 9, 16, 5, odds=[1, 1])
    with pytest.raises(ValueError, match="rule"):
        bucket_schedule({8: 10, 9: 10}, 9, 1, 5, odds=[1, 1], rule="nope")


@pytest.fixture(scope="module")
def dd_dir(tmp_path_factory):
    from seqpar.data.store import write_store

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 700, size=120).tolist() + [3000, 5000]
    docs = [np.full(n, d % 250 + 1, dtype=np.int64) for d, n in enumerate(lengths)]
    root = tmp_path_factory.mktemp("curr")
    write_store(str(root / "s"), docs, vocab_size=256)
    out = str(root / "dd")
    decompose_store(str(root / "s"), out, min_log2=2, max_log2=6, progress=False)
    return out


KW = dict(base_batch=3, curriculum="grow_linear", rule="paper", cycles=2, seed=11,
          num_steps=120)


def test_every_step_has_constant_targets(dd_dir):
    b = DecomposedBatches(dd_dir, **KW)
    for t in range(KW["num_steps"]):
        k = b.step_bucket(t)
        streams = b.step_streams(t)
        assert len(streams) == 3
        for s in streams:
            cu = s.cu_seqlens
            assert s.tokens.dtype == np.int64 and cu.dtype == np.int32
            assert np.all(np.diff(cu) == 2**k + 1) and cu[-1] == s.num_tokens
            assert int((np.diff(cu) - 1).sum()) == 2**6  # targets per stream
            for a, z in zip(cu[:-1], cu[1:]):  # a piece has one document's colour
                assert np.unique(s.tokens[a:z]).size == 1
    assert "grow_linear" in b.describe() and "3 x 2^6" in b.describe()


def test_resume_reproduces_steps(dd_dir):
    seq = DecomposedBatches(dd_dir, **KW)
    sequential = [seq.step_streams(t) for t in range(KW["num_steps"])]
    for t in (0, 1, 57, 119, 80):  # fresh objects, any order
        assert DecomposedBatches(dd_dir, **KW).step_streams(t) == sequential[t]
    other = DecomposedBatches(dd_dir, **{**KW, "seed": 12})
    assert any(other.step_streams(t) != sequential[t] for t in range(10))
    # within an epoch no piece is used twice
    s, seen = seq.schedule, set()
    for t in np.flatnonzero(s.epoch == 0):
        ids = {(int(s.bucket[t]), int(i)) for i in seq.step_piece_ids(t)}
        assert not ids & seen
        seen |= ids
    with pytest.raises(IndexError, match="num_steps"):
        seq.step_streams(KW["num_steps"])
