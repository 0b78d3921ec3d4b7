"""Dataset decomposition: the splitting rule, bucket stores, manifest validation, the CLI.

The position store's token ids are their global positions, so a piece is pure (one document,
no gap) iff its tokens are consecutive integers inside one document.
"""

import json
import math
import os

import numpy as np
import pytest

from seqpar.data.decompose import (DecomposeError, _plan, bucket_pieces, bucket_prefix,
                                   decompose_store, load_manifest, split_document)
from seqpar.data.store import StoreError, TokenStore, write_store
from tests.data.conftest import megatron_sentence_store

LENGTHS = list(range(0, 1200)) + [2047, 2048, 2049, 4097, 10_000, 65_537, 100_003]


def _check_pieces(length, pieces, lo, hi, overlap):
    pos = 0
    for start, stop, k in pieces:
        assert start == pos and stop - start == (1 << k) + 1 and lo <= k <= hi
        pos = stop - 1 if overlap else stop
    assert not pieces or pieces[-1][1] <= length


@pytest.mark.parametrize("randomize", [False, True])
@pytest.mark.parametrize("lo,hi", [(0, 6), (3, 8), (8, 13)])
def test_overlap_is_lossless_and_binary(randomize, lo, hi):
    rng = np.random.default_rng(1)
    for length in LENGTHS:
        pieces, dropped = split_document(length, lo, hi, randomize=randomize, rng=rng)
        _check_pieces(length, pieces, lo, hi, overlap=True)
        assert sum(1 << k for *_, k in pieces) + dropped == max(length - 1, 0)
        if lo == 0:
            assert dropped == 0  # nothing is ever too short to keep
        if 1 < length and length - 1 < 1 << (hi + 1):  # no cut above max: binary expansion
            bits = [b for b in range(hi, lo - 1, -1) if (length - 1) >> b & 1]
            assert [k for *_, k in pieces] == bits
            assert dropped == (length - 1) % (1 << lo)


def _released(length, lo, hi):
    """The released scripts' get_binary with randomize=False, on ranges (reference)."""
    out, pos = [], 0
    while length - pos > 1:
        k = int(math.log2(length - pos - 1))
        if k < lo:
            break
        k = min(k, hi)
        out.append((pos, pos + (1 << k) + 1, k))
        pos += (1 << k) + 1
    return out


def test_no_overlap_matches_released_scripts():
    hand = {  # min 8, max 9
        256: ([], 255),
        257: ([(0, 257, 8)], 0),
        514: ([(0, 513, 9)], 1),  # the cut loses the target of token 513
        1025: ([(0, 513, 9), (513, 770, 8)], 256),
        1000: ([(0, 513, 9), (513, 770, 8)], 231),
        2000: ([(0, 513, 9), (513, 1026, 9), (1026, 1539, 9), (1539, 1796, 8)], 207),
    }
    for length, expected in hand.items():
        assert split_document(length, 8, 9, overlap=False, randomize=False) == expected
    for length in LENGTHS:
        pieces, dropped = split_document(length, 3, 8, overlap=False, randomize=False)
        assert pieces == _released(length, 3, 8)
        assert sum(1 << k for *_, k in pieces) + dropped == max(length - 1, 0)
    # overlap keeps what the released cuts lose: 1024 targets = 512 + 512, nothing dropped
    assert split_document(1025, 8, 9, randomize=False) == ([(0, 513, 9), (512, 1025, 9)], 0)
    pieces, _ = split_document(5000, 4, 9, overlap=False, randomize=True,
                               rng=np.random.default_rng(0))
    _check_pieces(5000, pieces, 4, 9, overlap=False)


def test_randomized_split_balances_tokens():
    """Randomized cuts give each bucket roughly equal tokens on a long-tailed corpus.

    The rule equalises the tokens of the random cuts; the binary split of each document's last
    < 2^(max+1) tokens adds to the long buckets, so documents here are long (>= 100K).
    """
    rng = np.random.default_rng(0)
    lengths = np.minimum((rng.pareto(1.1, size=100) + 1) * 100_000, 3_000_000).astype(np.int64)
    plan, dropped = _plan(lengths, 8, 13, True, True, seed=0)
    tokens = np.array([d.size << k for k, (d, _) in plan.items()], dtype=np.float64)
    assert np.all(np.abs(tokens / tokens.mean() - 1) < 0.25), tokens / tokens.mean()
    plan, _ = _plan(lengths, 8, 13, True, False, seed=0)  # without: the longest bucket has all
    fixed = np.array([d.size << k for k, (d, _) in plan.items()], dtype=np.float64)
    assert fixed[-1] / fixed.sum() > 0.95


@pytest.fixture(scope="module")
def decomposed(position_store, tmp_path_factory):
    prefix, docs = position_store
    out = str(tmp_path_factory.mktemp("dd") / "out")
    return prefix, docs, out, decompose_store(prefix, out, min_log2=2, max_log2=6, seed=3,
                                              progress=False)


def test_bucket_stores_pure_and_complete(decomposed):
    prefix, docs, out, manifest = decomposed
    src = TokenStore(prefix)
    doc_of = lambda t: int(np.searchsorted(src.doc_offsets, t, side="right") - 1)  # noqa: E731
    covered = [np.zeros(max(d.size - 1, 0), dtype=np.int64) for d in docs]
    for b in manifest["buckets"]:
        store = TokenStore(bucket_prefix(out, b["k"]))
        assert store.num_docs == b["pieces"] and np.all(store.doc_lengths == (1 << b["k"]) + 1)
        for i in range(store.num_docs):
            piece = store.doc(i).astype(np.int64)
            assert np.all(np.diff(piece) == 1)  # contiguous, and one document only:
            d = doc_of(piece[0])
            assert doc_of(piece[-1]) == d
            first = int(piece[0] - src.doc_offsets[d])
            covered[d][first:first + piece.size - 1] += 1  # targets of this piece
    # overlap: each target is in at most one piece; the rest are the dropped targets
    assert all(c.max(initial=0) <= 1 for c in covered)
    kept = sum(int(c.sum()) for c in covered)
    assert kept == sum(b["targets"] for b in manifest["buckets"])
    assert kept + manifest["dropped_targets"] == manifest["source_targets"] == sum(
        max(d.size - 1, 0) for d in docs)
    assert manifest["settings"] == {"min_log2": 2, "max_log2": 6, "overlap": True,
                                    "randomize": True, "seed": 3}
    assert manifest["vocab_size"] == src.max_token_id() + 1 == manifest["max_token_id"] + 1


def test_deterministic_from_seed(decomposed, tmp_path):
    prefix, _, out, manifest = decomposed
    again = decompose_store(prefix, str(tmp_path / "a"), min_log2=2, max_log2=6, seed=3,
                            progress=False)
    assert again == manifest
    for b in manifest["buckets"]:
        with open(bucket_prefix(out, b["k"]) + ".bin", "rb") as f1, \
                open(bucket_prefix(str(tmp_path / "a"), b["k"]) + ".bin", "rb") as f2:
            assert f1.read() == f2.read()
    other = decompose_store(prefix, str(tmp_path / "b"), min_log2=2, max_log2=6, seed=4,
                            progress=False)
    assert bucket_pieces(other) != bucket_pieces(manifest)


def test_megatron_store_read_by_document(tmp_path):
    prefix = str(tmp_path / "mega")
    docs = [np.concatenate(s) for s in megatron_sentence_store(prefix)]
    out = str(tmp_path / "out")
    manifest = decompose_store(prefix, out, min_log2=2, max_log2=5, randomize=False,
                               progress=False)
    expected = {k: [] for k in range(2, 6)}
    for doc in docs:  # documents as stored (EOD already last): no second EOT
        for start, stop, k in split_document(doc.size, 2, 5, randomize=False)[0]:
            expected[k].append(doc[start:stop])
    for k, pieces in expected.items():
        store = TokenStore(bucket_prefix(out, k))
        assert store.num_docs == len(pieces)
        for i, piece in enumerate(pieces):
            assert np.array_equal(store.doc(i), piece)
    assert manifest["eot_id"] is None and manifest["vocab_from"] == "max_token_id"


def test_empty_bucket_is_valid(tmp_path):
    prefix = str(tmp_path / "s")
    write_store(prefix, [np.arange(40) % 7, np.arange(9) % 7], vocab_size=7)
    out = str(tmp_path / "out")
    decompose_store(prefix, out, min_log2=2, max_log2=8, progress=False)
    pieces = bucket_pieces(load_manifest(out))
    assert pieces[8] == 0 and sum(pieces.values()) > 0
    assert not os.path.exists(bucket_prefix(out, 8) + ".bin")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst, os.path.join(dst, "manifest.json")


@pytest.mark.parametrize("damage,words", [
    ("missing", "is missing"),
    ("json", "not valid JSON"),
    ("version", "unknown version"),
    ("bucket_file", "bucket_04"),
    ("counts", "mismatched manifest"),
])
def test_bad_manifest_errors(decomposed, tmp_path, damage, words):
    out, path = _copy(decomposed[2], str(tmp_path / "c"))
    manifest = json.load(open(path))
    if damage == "missing":
        os.remove(path)
    elif damage == "json":
        open(path, "w").write('{"version": 1, "buckets": [')
    elif damage == "version":
        manifest["version"] = 99
        json.dump(manifest, open(path, "w"))
    elif damage == "bucket_file":
        os.remove(bucket_prefix(out, 4) + ".idx")
    else:
        manifest["buckets"][1]["pieces"] += 1
        json.dump(manifest, open(path, "w"))
    with pytest.raises(DecomposeError) as exc:
        load_manifest(out)
    msg = str(exc.value)
    assert isinstance(exc.value, StoreError) and "\n" not in msg
    assert words in msg and "seqpar data decompose" in msg and out in msg


def test_cli_round_trip(position_store, tmp_path, capsys):
    from seqpar.launcher.cli import main

    out = str(tmp_path / "cli")
    rc = main(["data", "decompose", position_store[0], "--min-log2", "3", "--max-log2", "7",
               "--no-overlap", "--seed", "5", "--output", out, "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "dropped targets" in text
    manifest = load_manifest(out)
    assert manifest["settings"] == {"min_log2": 3, "max_log2": 7, "overlap": False,
                                    "randomize": True, "seed": 5}
    for b in manifest["buckets"]:
        assert f"{b['pieces']:,}" in text
    assert main(["data", "decompose", str(tmp_path / "nope"), "--output", out]) == 2
    assert "is missing" in capsys.readouterr().err


def test_prepared_store_keeps_vocab_and_single_eot(tmp_path):
    from seqpar.data.prepare import prepare, read_metadata

    texts = tmp_path / "texts"
    texts.mkdir()
    for i, n in enumerate((40, 300, 1000)):
        (texts / f"{i}.txt").write_text("ab" * (n // 2))
    prepare([str(texts)], str(tmp_path / "p"), "byte", progress=False)
    meta = read_metadata(str(tmp_path / "p"))
    out = str(tmp_path / "dd")
    manifest = decompose_store(str(tmp_path / "p"), out, min_log2=0, max_log2=6,
                               randomize=False, progress=False)
    assert (manifest["vocab_size"], manifest["eot_id"]) == (meta["vocab_size"], meta["eot_id"])
    eots = sum(int((TokenStore(bucket_prefix(out, b["k"])).doc(i) == meta["eot_id"]).sum())
               for b in manifest["buckets"] for i in range(b["pieces"]))
    assert eots == 3 and manifest["dropped_targets"] == 0  # one EOT per document, none added
