"""TokenStore: documents over Megatron sequences, spans, and clear errors on bad files."""

import os
import pickle
import shutil
import struct

import numpy as np
import pytest

from seqpar.data.store import StoreError, TokenStore, write_store
from seqpar.data.streams import PackedStreams
from tests.data.conftest import megatron_sentence_store


def test_megatron_sentence_store_reads_documents(tmp_path):
    prefix = str(tmp_path / "meg_text_document")
    docs = megatron_sentence_store(prefix)
    store = TokenStore(prefix + ".idx")
    assert store.prefix == prefix
    assert store.dtype == np.int32
    assert store._ds.index.sequence_count > store.num_docs  # several sentences per document
    assert store.num_docs == len(docs)
    expected = [np.concatenate(sents) for sents in docs]
    assert store.doc_lengths.tolist() == [e.size for e in expected]
    for i, e in enumerate(expected):
        assert np.array_equal(store.doc(i), e)
        assert store.doc(i)[-1] == 0  # EOD closes the document, not each sentence
        a, b = e.size // 3, e.size - e.size // 4
        assert np.array_equal(store.span(i, a, b), e[a:b])
    assert store.max_token_id() == max(int(e.max()) for e in expected)
    for mode in ("concat_chunk", "pack"):
        ps = PackedStreams(store, mode=mode, seq_len=64, seed=3)
        flat = np.concatenate(expected)
        for i in range(ps.streams_in_epoch(0)):
            s = ps[i]
            assert s.tokens.dtype == np.int64 and s.tokens.size <= 64
            assert np.isin(s.tokens, flat).all()
    with pytest.raises(IndexError):
        store.doc(len(docs))
    with pytest.raises(IndexError):
        store.span(0, 0, expected[0].size + 1)
    again = pickle.loads(pickle.dumps(store))
    assert np.array_equal(again.doc(3), store.doc(3))


def test_write_store_dtypes_and_checks(tmp_path):
    prefix = str(tmp_path / "w")
    stats = write_store(prefix, [np.array([1, 2, 70000]), np.array([], dtype=np.int64), [5]],
                        vocab_size=70001)
    assert stats == {"num_docs": 2, "num_tokens": 4}  # the empty document is skipped
    store = TokenStore(prefix)
    assert store.dtype == np.int32 and store.doc(0).tolist() == [1, 2, 70000]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_store(prefix, [np.array([1, 257])], vocab_size=257)
    with pytest.raises(ValueError, match="integers"):
        write_store(prefix, [np.array([1.5])], vocab_size=257)
    assert TokenStore(prefix).num_docs == 2  # failed writes left the old store intact
    assert sorted(os.listdir(tmp_path)) == ["w.bin", "w.idx"]


@pytest.fixture
def fresh_store(tmp_path, position_store):
    src, _ = position_store
    prefix = str(tmp_path / "copy")
    for s in (".bin", ".idx"):
        shutil.copy(src + s, prefix + s)
    assert TokenStore(prefix).num_docs > 0
    return prefix


def _assert_store_error(prefix, path, *words):
    with pytest.raises(StoreError) as err:
        TokenStore(prefix)
    msg = str(err.value)
    assert path in msg and "seqpar data prepare" in msg, msg
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_missing_files(fresh_store):
    os.remove(fresh_store + ".bin")
    _assert_store_error(fresh_store, fresh_store + ".bin", "missing")
    _assert_store_error(fresh_store + "-nope", fresh_store + "-nope.idx", "missing")


@pytest.mark.parametrize("damage", ["truncate", "tiny", "garbage", "header_only"])
def test_corrupt_idx(fresh_store, damage):
    idx = fresh_store + ".idx"
    data = open(idx, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "tiny":
        data = data[:10]
    elif damage == "garbage":
        data = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    else:
        data = data[:34]
    open(idx, "wb").write(data)
    _assert_store_error(fresh_store, idx, "corrupt")


def test_idx_that_megatron_rejects(tmp_path):
    # Right size and header, but the document index does not end at the sequence count:
    # megatron's own assertion fires and must come back as a StoreError.
    prefix = str(tmp_path / "m")
    head = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 2)
    body = (np.array([3, 4], np.int32).tobytes() + np.array([0, 6], np.int64).tobytes()
            + np.array([0, 1], np.int64).tobytes())
    open(prefix + ".idx", "wb").write(head + body)
    open(prefix + ".bin", "wb").write(b"\0" * 14)
    _assert_store_error(prefix, prefix + ".idx", "corrupt")


@pytest.mark.parametrize("delta", [-2, 2, 4096])
def test_bin_of_wrong_size(fresh_store, delta):
    path = fresh_store + ".bin"
    data = open(path, "rb").read()
    open(path, "wb").write(data[:delta] if delta < 0 else data + b"\1" * delta)
    _assert_store_error(fresh_store, path, "bytes")
