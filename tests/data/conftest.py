"""Fixtures for the data tests: small stores whose tokens identify their own position."""

import numpy as np
import pytest

# Lengths chosen around SEQ_LEN: single tokens, exact multiples, one-over, and long documents.
SEQ_LEN = 128
_FIXED_LENGTHS = [1, 1, 2, 127, 128, 129, 256, 257, 300, 700, 1000]


def position_docs(seed: int = 0, n_random: int = 60) -> list[np.ndarray]:
    """Documents whose tokens are their global positions: doc d = arange(off_d, off_d + len_d).

    Every token is unique, so a test can tell which document (and where in it) any token of
    a stream came from, and whether a piece mixes two documents.
    """
    rng = np.random.default_rng(seed)
    lengths = _FIXED_LENGTHS + rng.integers(1, 400, size=n_random).tolist()
    rng.shuffle(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [np.arange(offsets[i], offsets[i + 1], dtype=np.int64) for i in range(len(lengths))]


@pytest.fixture(scope="session")
def position_store(tmp_path_factory):
    """(prefix, docs) of a uint16 store written by write_store; vocab = number of tokens."""
    from seqpar.data.store import write_store

    docs = position_docs()
    total = sum(d.size for d in docs)
    prefix = str(tmp_path_factory.mktemp("position") / "pos")
    stats = write_store(prefix, docs, vocab_size=total)
    assert stats == {"num_docs": len(docs), "num_tokens": total}
    return prefix, docs


def megatron_sentence_store(prefix: str, n_docs: int = 25, eod: int = 0, seed: int = 1):
    """Build a store the way Megatron's preprocess_data.py --split-sentences --append-eod does.

    int32 tokens, one Megatron sequence per sentence, several sentences per document, the
    EOD token appended to the document's last sentence. Returns the list of documents, each a
    list of sentence arrays.
    """
    import torch

    from seqpar.data.store import megatron_indexed_dataset

    mod = megatron_indexed_dataset()
    rng = np.random.default_rng(seed)
    builder = mod.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    docs = []
    for _ in range(n_docs):
        sentences = [rng.integers(1, 70000, size=int(rng.integers(1, 90))).astype(np.int32)
                     for _ in range(int(rng.integers(1, 6)))]
        sentences[-1] = np.append(sentences[-1], np.int32(eod))
        builder.add_document(torch.from_numpy(np.concatenate(sentences)),
                             [s.size for s in sentences])
        docs.append(sentences)
    builder.finalize(prefix + ".idx")
    return docs
