"""Pure tests of seqpar.attention.layout (no processes): contiguous, per-document zigzag, hybrid.

Every expectation is derived here from the global ``cu_seqlens`` (spec: specs/sequence-parallel.md,
"Layout"), not from the code under test.

Run: python -m pytest tests/attention/test_layout.py -q
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from seqpar.attention.layout import (
    LAYOUTS,
    Layout,
    build_layout,
    causal_work,
    contiguous_layout,
    hybrid_layout,
    zigzag_layout,
)

WORLDS = [1, 2, 3, 4, 8]
AWKWARD = [[17, 31, 11], [1987, 523, 271, 1009], [3891], [8191, 8192]]
# Zero-length documents anywhere, an empty stream, a stream without documents, tiny documents.
EDGE = [[5, 0, 7], [0, 10], [10, 0], [0, 0, 3, 0], [0], [], [1], [3], [1, 1, 1, 1, 1], [2, 40, 1, 0, 16]]


def _cu(seqlens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(seqlens, dtype=np.int64))]).astype(np.int32)


def _doc_pos(cu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Document id and position of every token, by explicit loops (independent of the layout code)."""
    doc, pos = [], []
    for d in range(len(cu) - 1):
        n = int(cu[d + 1] - cu[d])
        doc += [d] * n
        pos += list(range(n))
    return np.asarray(doc, dtype=np.int64), np.asarray(pos, dtype=np.int64)


def _all_layouts(seqlens, world: int) -> list[Layout]:
    """Every layout of ``world`` ranks: contiguous, zigzag, and each hybrid U x R factorisation."""
    cu = _cu(seqlens)
    out = [build_layout(cu, "contiguous", ring=world), build_layout(cu, "zigzag", ring=world)]
    for u in range(2, world):
        if world % u == 0:
            out += [build_layout(cu, kind, ulysses=u, ring=world // u) for kind in LAYOUTS]
    return out


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (so -0.0 vs 0.0 or NaN payloads would count as differences)."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return x.view(ints[x.dtype]) if x.dtype in ints else x


def _check_partition(layout: Layout, total: int) -> None:
    assert layout.total == total
    for ix in layout.indices:
        assert ix.dtype == np.int64 and ix.ndim == 1
        assert np.all(np.diff(ix) > 0), f"{layout.kind}: a rank's indices are not strictly ascending"
    allix = np.concatenate(layout.indices) if layout.indices else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(allix), np.arange(total), err_msg=f"{layout.kind}: not every token exactly once")
    assert sum(layout.counts()) == total


# --- contiguous ------------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS + [5, 7])
@pytest.mark.parametrize("total", [0, 1, 3, 7, 8, 17, 59, 1000, 16383])
def test_contiguous_sizes_and_order(total, world):
    lay = contiguous_layout(total, world)
    sizes = lay.counts()
    assert lay.world == world
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.concatenate(lay.indices), np.arange(total))
    # rank r holds [r*T/P, (r+1)*T/P) up to rounding: each run is contiguous
    for ix in lay.indices:
        if ix.size:
            np.testing.assert_array_equal(ix, np.arange(ix[0], ix[0] + ix.size))
    built = build_layout(_cu([total]), "contiguous", ring=world)
    assert all(np.array_equal(a, b) for a, b in zip(built.indices, lay.indices))


# --- zigzag ----------------------------------------------------------------------------------


def _owner(layout: Layout) -> np.ndarray:
    owner = np.full(layout.total, -1, dtype=np.int64)
    for r, ix in enumerate(layout.indices):
        owner[ix] = r
    return owner


def _runs(seq: np.ndarray) -> list[tuple[int, int]]:
    """(value, length) of the maximal runs of equal values."""
    runs: list[tuple[int, int]] = []
    for x in seq.tolist():
        if runs and runs[-1][0] == x:
            runs[-1] = (x, runs[-1][1] + 1)
        else:
            runs.append((x, 1))
    return runs


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("seqlens", AWKWARD + [[16, 17, 18, 19, 20, 21, 22, 23, 24], [64] * 3, [1000, 2, 999]])
def test_zigzag_long_documents_get_chunks_r_and_2p_minus_1_minus_r(seqlens, world):
    cu = _cu(seqlens)
    lay = zigzag_layout(cu, world)
    owner = _owner(lay)
    n = 2 * world
    for d, length in enumerate(seqlens):
        if length < n:
            continue
        runs = _runs(owner[cu[d] : cu[d + 1]])
        # Chunks 0..2P-1 go to ranks 0,1,..,P-1,P-1,..,1,0: chunks P-1 and P merge into one run.
        expected_ranks = list(range(world)) + list(range(world - 2, -1, -1))
        assert [r for r, _ in runs] == expected_ranks, f"document {d} (L={length}) on P={world}: runs {runs}"
        lo, hi = length // n, -(-length // n)
        sizes = [s for _, s in runs]
        mid = world - 1
        for i, s in enumerate(sizes):
            if i == mid:  # two chunks
                assert 2 * lo <= s <= 2 * hi, (d, sizes)
            else:
                assert lo <= s <= hi, f"document {d} (L={length}) on P={world}: chunk sizes {sizes} differ by more than one"
        # Rank r's positions in the document are exactly the chunks r and 2P-1-r of a cut into 2P
        # consecutive chunks: the smallest position of its first run is the size of chunks 0..r-1.
        bounds = np.cumsum([0] + sizes)
        for r in range(world):
            pos = lay.indices[r][(lay.indices[r] >= cu[d]) & (lay.indices[r] < cu[d + 1])] - cu[d]
            first = np.arange(bounds[r], bounds[r + 1])
            if r == mid:
                np.testing.assert_array_equal(pos, np.arange(bounds[r], bounds[r + 1]))
                continue
            last_run = len(sizes) - 1 - r
            second = np.arange(bounds[last_run], bounds[last_run + 1])
            np.testing.assert_array_equal(pos, np.concatenate([first, second]))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("rem", [1, 3])
def test_zigzag_extra_tokens_rotate_between_documents(world, rem):
    """2P documents of length 2P+rem: 2P*rem extra tokens, which must spread evenly over the chunks."""
    n = 2 * world
    seqlens = [n + rem] * n
    lay = zigzag_layout(_cu(seqlens), world)
    counts = lay.counts()
    # Without rotation rank 0 (chunks 0 and 2P-1) would take every remainder token of every document.
    assert len(set(counts)) == 1, f"P={world}, documents of {n + rem}: tokens per rank {counts} (remainders pile up)"
    # And per document: the rank holding the extra token of document i is not always the same one.
    if rem == 1:
        owner = _owner(lay)
        cu = _cu(seqlens)
        extra_rank = []
        for d in range(n):
            per_rank = np.bincount(owner[cu[d] : cu[d + 1]], minlength=world)
            extra_rank.append(int(np.argmax(per_rank)))
        assert len(set(extra_rank)) == world, extra_rank


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_short_documents_go_whole_to_least_loaded_rank(world):
    n = 2 * world
    seqlens = [n - 1, 1, n - 1, 2, 3, 1, n - 1, n]
    cu = _cu(seqlens)
    lay = zigzag_layout(cu, world)
    owner = _owner(lay)
    for d, length in enumerate(seqlens):
        ranks = set(owner[cu[d] : cu[d + 1]].tolist())
        if length < n:
            assert len(ranks) == 1, f"document {d} of length {length} < 2P={n} was split over ranks {ranks}"
    # Greedy rule, replayed independently: each short document goes to the rank with the least
    # causal work so far (ties: fewer tokens, then lowest rank).
    work = [0] * world
    tokens = [0] * world
    for d, length in enumerate(seqlens):
        if length >= n:
            for r in range(world):
                pos = lay.indices[r][(lay.indices[r] >= cu[d]) & (lay.indices[r] < cu[d + 1])] - cu[d]
                work[r] += int((pos + 1).sum())
                tokens[r] += pos.size
            continue
        r = min(range(world), key=lambda i: (work[i], tokens[i], i))
        assert owner[cu[d]] == r, f"document {d} (L={length}) went to rank {owner[cu[d]]}, least loaded is {r}"
        work[r] += length * (length + 1) // 2
        tokens[r] += length


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_tiny_stream_leaves_ranks_empty(world):
    lay = zigzag_layout(_cu([3]), world)
    assert sorted(lay.counts()) == [0] * (world - 1) + [3]
    _check_partition(lay, 3)
    x = torch.arange(3.0)
    shards = [lay.shard(x, r) for r in range(world)]
    assert sum(s.numel() == 0 for s in shards) == world - 1
    assert torch.equal(lay.unshard(shards), x)


def _calls(fn) -> int:
    """Python and C function calls made by fn(): a count that does not depend on the machine."""
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        n += event in ("call", "c_call")

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def test_zigzag_layout_work_is_linear_in_documents():
    """Layouts are built for every micro-batch on every rank, so their work must grow linearly
    with the documents, not quadratically (an earlier version summed every rank's parts per
    short document). Counted in function calls, not timed: doubling 1,500 documents to 3,000
    (long and short alternating, 31.5K tokens) at most doubles the calls."""
    small, large = _cu([20, 3] * 750), _cu([20, 3] * 1500)
    _check_partition(zigzag_layout(large, 8), int(large[-1]))
    n_small = _calls(lambda: zigzag_layout(small, 8))
    n_large = _calls(lambda: zigzag_layout(large, 8))
    assert n_large <= 2.1 * n_small, (n_small, n_large)


def test_zigzag_threshold_is_configurable():
    cu = _cu([20])
    assert sorted(zigzag_layout(cu, 2, min_doc_len=32).counts()) == [0, 20]  # below the threshold: whole
    assert zigzag_layout(cu, 2, min_doc_len=16).counts() == [10, 10]


# --- partition, shard / unshard ----------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS + [6])
@pytest.mark.parametrize("seqlens", AWKWARD + EDGE, ids=lambda s: str(s)[:40])
def test_every_token_once_and_sorted(seqlens, world):
    total = int(sum(seqlens))
    for lay in _all_layouts(seqlens, world):
        assert lay.world == world
        _check_partition(lay, total)


@pytest.mark.parametrize("world", WORLDS + [6])
@pytest.mark.parametrize("seqlens", AWKWARD + EDGE, ids=lambda s: str(s)[:40])
def test_shard_unshard_bitwise_round_trip(seqlens, world):
    total = int(sum(seqlens))
    g = torch.Generator().manual_seed(total + world)
    cu = _cu(seqlens)
    doc, pos = _doc_pos(cu)
    tensors = [
        torch.randn(total, 3, 5, generator=g, dtype=torch.float32),
        torch.randn(total, 2, generator=g, dtype=torch.float64).to(torch.bfloat16),
        torch.randint(0, 50000, (total,), generator=g, dtype=torch.int64),  # token ids / labels
        torch.from_numpy(doc),
        torch.from_numpy(pos).to(torch.int32),
    ]
    for lay in _all_layouts(seqlens, world):
        for x in tensors:
            shards = [lay.shard(x, r) for r in range(world)]
            for r, s in enumerate(shards):
                assert s.dtype == x.dtype and s.shape == (lay.counts()[r], *x.shape[1:])
            back = lay.unshard(shards)
            assert back.dtype == x.dtype and back.shape == x.shape
            assert torch.equal(_bits(back), _bits(x)), f"{lay.kind} P={world}: unshard(shard(x)) != x bitwise"
        # Every rank can compute every other rank's document ids and positions from cu_seqlens alone.
        for r in range(world):
            ix = lay.indices[r]
            np.testing.assert_array_equal(lay.shard(torch.from_numpy(doc), r).numpy(), doc[ix])
            np.testing.assert_array_equal(lay.shard(torch.from_numpy(pos), r).numpy(), pos[ix])


def test_shard_and_unshard_reject_mismatches():
    lay = build_layout(_cu([10, 6]), "zigzag", ring=2)
    with pytest.raises(ValueError, match="16 tokens"):
        lay.shard(torch.zeros(15), 0)
    with pytest.raises(ValueError, match="2 shards"):
        lay.unshard([torch.zeros(8)])


# --- hybrid ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (2, 4), (4, 2), (2, 3), (3, 2), (1, 4), (4, 1)])
@pytest.mark.parametrize("seqlens", AWKWARD + [[3], [5, 0, 7], [40, 2, 1, 33]], ids=lambda s: str(s)[:40])
def test_hybrid_ring_blocks_are_the_zigzag_layout(seqlens, ulysses, ring):
    cu = _cu(seqlens)
    lay = hybrid_layout(cu, ulysses, ring)
    zig = zigzag_layout(cu, ring)
    assert lay.world == ulysses * ring
    _check_partition(lay, int(sum(seqlens)))
    for j in range(ring):
        # SP rank ring_index * U + u: the U ranks of ring block j, in order, are the block contiguous.
        members = [j * ulysses + u for u in range(ulysses)]
        np.testing.assert_array_equal(lay.concat(members), zig.indices[j])
        sizes = [lay.indices[m].size for m in members]
        assert max(sizes) - min(sizes) <= 1, f"ring block {j}: Ulysses shard sizes {sizes}"
    if ulysses > 1 and ring > 1:
        built = build_layout(cu, "zigzag", ulysses=ulysses, ring=ring)
        assert all(np.array_equal(a, b) for a, b in zip(built.indices, lay.indices))


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (2, 4), (4, 2)])
def test_hybrid_contiguous_ring_dimension(ulysses, ring):
    seqlens = [1987, 523, 271, 1009]
    lay = build_layout(_cu(seqlens), "contiguous", ulysses=ulysses, ring=ring)
    outer = contiguous_layout(sum(seqlens), ring)
    for j in range(ring):
        np.testing.assert_array_equal(lay.concat(range(j * ulysses, (j + 1) * ulysses)), outer.indices[j])


# --- errors ----------------------------------------------------------------------------------


def test_unknown_layout_names_the_choices():
    with pytest.raises(ValueError) as err:
        build_layout(_cu([8]), "striped", ring=2)
    msg = str(err.value)
    assert "striped" in msg
    for name in ("contiguous", "zigzag"):
        assert name in msg, msg


@pytest.mark.parametrize(
    "cu",
    [np.array([1, 5], np.int32), np.array([0, 5, 3], np.int32), np.zeros((2, 2), np.int32), np.zeros(0, np.int32)],
    ids=["not-from-0", "decreasing", "2-d", "empty"],
)
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_bad_cu_seqlens_is_an_error(cu, kind):
    with pytest.raises(ValueError, match="cu_seqlens"):
        build_layout(cu, kind, ring=2)
    if kind == "zigzag":
        with pytest.raises(ValueError, match="cu_seqlens"):
            zigzag_layout(cu, 2)


def test_bad_world_is_an_error():
    with pytest.raises(ValueError, match="world size"):
        build_layout(_cu([8]), "zigzag", ring=0)
    with pytest.raises(ValueError, match="world size"):
        zigzag_layout(_cu([8]), 0)


def test_contiguous_layout_rejects_bad_world():
    """The public contiguous_layout must fail with a message, not ZeroDivisionError."""
    with pytest.raises(ValueError, match="world size"):
        contiguous_layout(10, 0)


def test_hybrid_layout_rejects_unknown_ring_layout():
    """hybrid_layout is public: an unknown ring layout must be an error, not silently contiguous."""
    with pytest.raises(ValueError) as err:
        hybrid_layout(_cu([16]), 2, 2, ring_layout="striped")
    assert "zigzag" in str(err.value) and "contiguous" in str(err.value), str(err.value)


# --- causal work -----------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("seqlens", AWKWARD + EDGE, ids=lambda s: str(s)[:40])
def test_causal_work_sums_to_visible_pairs(seqlens, world):
    cu = _cu(seqlens)
    doc, pos = _doc_pos(cu)
    lengths = np.asarray(seqlens, dtype=np.int64)
    causal_total = int((lengths * (lengths + 1) // 2).sum())
    full_total = int((lengths * lengths).sum())
    for lay in _all_layouts(seqlens, world):
        per_rank = [causal_work(lay, cu, r) for r in range(world)]
        assert sum(per_rank) == causal_total, (lay.kind, per_rank)
        assert sum(causal_work(lay, cu, r, causal=False) for r in range(world)) == full_total
        for r in range(world):
            ix = lay.indices[r]
            assert per_rank[r] == int((pos[ix] + 1).sum())
            assert causal_work(lay, cu, r, causal=False) == int(lengths[doc[ix]].sum())
