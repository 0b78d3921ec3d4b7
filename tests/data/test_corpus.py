"""The embedded stdlib corpus: built once, reused, safe under concurrent first use."""

import multiprocessing as mp
import os
import sys

import numpy as np
import pytest

from seqpar.data.corpus import default_cache_dir, embedded_corpus, embedded_corpus_files
from seqpar.data.prepare import read_metadata
from seqpar.data.store import TokenStore
from seqpar.data.streams import PackedStreams
from tests.data.test_streams import digest

STREAM_ARGS = [("pack", 4096, 5), ("concat_chunk", 1000, 6)]


def _stream_digests(prefix):
    return [digest(PackedStreams(prefix, mode=m, seq_len=n, seed=s), 20)
            for m, n, s in STREAM_ARGS]


def _worker(cache_dir):
    """Runs in a freshly spawned interpreter: first use of the corpus, then a few streams."""
    prefix = embedded_corpus(cache_dir, progress=False)
    return prefix, _stream_digests(prefix)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    prefix = embedded_corpus(cache, progress=False)
    return cache, prefix


def test_builds_stdlib_corpus(corpus):
    cache, prefix = corpus
    files = embedded_corpus_files()
    assert len(files) > 1000 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f or "__pycache__" in f for f in files)
    assert os.path.dirname(prefix) == cache
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in os.path.basename(prefix)
    store = TokenStore(prefix)
    assert store.num_docs == len(files)
    assert store.num_tokens > 10_000_000 and store.doc_lengths.max() > 100_000
    assert store.max_token_id() == 256 and store.dtype == np.uint16
    biggest = int(np.argmax(store.doc_lengths))
    for i in (0, biggest, len(files) - 1):
        raw = open(files[i], "rb").read()
        assert store.doc(i).tolist() == list(raw) + [256]
    meta = read_metadata(prefix)
    assert meta["tokenizer"] == "byte" and meta["num_docs"] == len(files)
    ps = PackedStreams(store, mode="pack", seq_len=4096, seed=0)
    assert store.num_tokens / (ps.streams_in_epoch(0) * 4096) > 0.99  # best fit packs tightly


def test_second_call_reuses_store(corpus):
    cache, prefix = corpus
    before = {s: os.stat(prefix + s).st_mtime_ns for s in (".bin", ".idx", ".json")}
    assert embedded_corpus(cache, progress=True) == prefix
    assert {s: os.stat(prefix + s).st_mtime_ns for s in before} == before


def test_concurrent_first_use_from_fresh_processes(corpus, tmp_path):
    """Two spawned interpreters race to build into an empty cache: one store, same streams.

    Spawned (not forked) workers also show that streams are a pure function of their
    arguments: a fresh interpreter computes exactly the streams this process computes.
    """
    cache = str(tmp_path / "race")
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_worker, [cache, cache])
    (p1, d1), (p2, d2) = results
    assert p1 == p2 and os.path.dirname(p1) == cache
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(p1) + s
                                               for s in (".bin", ".idx", ".json", ".lock"))
    ref = TokenStore(corpus[1])
    store = TokenStore(p1)
    assert np.array_equal(store.doc_lengths, ref.doc_lengths)
    with open(p1 + ".bin", "rb") as a, open(corpus[1] + ".bin", "rb") as b:
        assert a.read() == b.read()
    assert d1 == d2 == _stream_digests(corpus[1])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQPAR_CACHE", str(tmp_path))
    assert default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("SEQPAR_CACHE")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "seqpar")
