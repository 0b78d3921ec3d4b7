"""On-disk token stores in Megatron's indexed-dataset format (``PREFIX.bin`` + ``PREFIX.idx``).

Reading and writing go through megatron-core (``IndexedDataset`` / ``IndexedDatasetBuilder``),
so stores built by Megatron's ``preprocess_data.py`` and by ``seqpar data prepare`` are
interchangeable. Megatron items are *sequences*; ``document_indices`` group them into
*documents* (``--split-sentences`` puts several sentences in one document). seqpar always
works on documents: a document's tokens are the concatenation of its sequences, which lie
contiguously in the ``.bin`` file (checked on open).

megatron-core takes ~5 s to import and warns about missing Transformer Engine / Apex, so it
is imported lazily, with those warnings silenced, the first time a store is touched.
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import Any, Iterable

import numpy as np

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 34  # magic(9) + version(8) + dtype code(1) + sequence count(8) + doc count(8)
_MAX_CHUNK = 1 << 24  # tokens per read when scanning the whole .bin


class StoreError(ValueError):
    """A token store is missing or unreadable; the message says what to do."""


def megatron_indexed_dataset() -> Any:
    """Import ``megatron.core.datasets.indexed_dataset`` quietly (it warns about TE/Apex)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def strip_prefix(prefix: str) -> str:
    """``data/x.bin`` / ``data/x.idx`` / ``data/x`` -> ``data/x``."""
    prefix = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def _corrupt(path: str, what: str) -> StoreError:
    return StoreError(f"token store file {path} is corrupt ({what}); delete it and re-run "
                      "`seqpar data prepare` to rebuild the store")


def _check_idx_layout(idx_path: str) -> None:
    """Cheap structural check of the .idx before megatron maps it.

    Megatron asserts or fails inside ``numpy.frombuffer`` on bad files and then errors again
    in its own ``__del__``; checking the header and the exact file size first gives one clean
    message for truncated or garbage files.
    """
    size = os.path.getsize(idx_path)
    if size < _HEADER_BYTES:
        raise _corrupt(idx_path, f"{size} bytes, shorter than the {_HEADER_BYTES}-byte header")
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if head[:9] != _INDEX_HEADER:
        raise _corrupt(idx_path, "not a Megatron MMIDIDX index")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or not 1 <= code <= 8:
        raise _corrupt(idx_path, f"unknown version {version} or dtype code {code}")
    expected = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
    # Multimodal Megatron stores append one int8 mode per sequence.
    if size not in (expected, expected + n_seq):
        raise _corrupt(idx_path, f"{size} bytes but its header implies {expected} "
                                 f"({n_seq} sequences, {n_doc} document indices)")


class DocumentSizes:
    """Sizes of a store-like object from its ``_doc_lengths`` (int64 [num_docs]): what the packers
    read (``TokenStore``, and a blend's document view ``seqpar.data.blend.BlendedDocs``)."""

    _doc_lengths: np.ndarray

    @property
    def num_docs(self) -> int:
        return int(self._doc_lengths.size)

    @property
    def doc_lengths(self) -> np.ndarray:
        """int64 [num_docs]: tokens per document (its sequences concatenated)."""
        return self._doc_lengths

    @property
    def num_tokens(self) -> int:
        return int(self._doc_lengths.sum())

    def __len__(self) -> int:
        return self.num_docs


class TokenStore(DocumentSizes):
    """Read-only, memory-mapped view of a Megatron indexed dataset, by document.

    Args:
        prefix: path prefix of the store; a trailing ``.bin`` or ``.idx`` is ignored.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix: str = strip_prefix(prefix)
        self.bin_path = self.prefix + ".bin"
        self.idx_path = self.prefix + ".idx"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise StoreError(f"token store file {path} is missing; build the store with "
                                 f"`seqpar data prepare` (output prefix {self.prefix})")
        _check_idx_layout(self.idx_path)
        mod = megatron_indexed_dataset()
        try:
            self._ds = mod.IndexedDataset(self.prefix, mmap=True)
        except (AssertionError, struct.error, ValueError, TypeError, OSError) as exc:
            raise _corrupt(self.idx_path, f"megatron could not read it: {exc}") from exc
        index = self._ds.index
        self._type = index.dtype  # numpy scalar type, e.g. numpy.uint16
        self.dtype: np.dtype = np.dtype(self._type)
        seq_lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
        doc_idx = np.asarray(index.document_indices, dtype=np.int64)
        if seq_lengths.size and seq_lengths.min() < 0:
            raise _corrupt(self.idx_path, "negative sequence length")
        if doc_idx.size == 0 or doc_idx[0] != 0 or np.any(np.diff(doc_idx) < 0):
            raise _corrupt(self.idx_path, "document indices do not start at 0 and increase")
        seq_offsets = np.zeros(seq_lengths.size + 1, dtype=np.int64)
        np.cumsum(seq_lengths, out=seq_offsets[1:])
        # Documents are read as one contiguous span; that needs sequences laid out back to
        # back, which every Megatron builder does. Verify instead of assuming.
        if not np.array_equal(np.asarray(index.sequence_pointers, dtype=np.int64),
                              seq_offsets[:-1] * self.dtype.itemsize):
            raise _corrupt(self.idx_path, "sequence pointers are not contiguous")
        expected_bin = int(seq_offsets[-1]) * self.dtype.itemsize
        actual_bin = os.path.getsize(self.bin_path)
        if actual_bin != expected_bin:
            raise StoreError(f"token store file {self.bin_path} has {actual_bin} bytes but "
                             f"{self.idx_path} describes {expected_bin}; the pair is from "
                             "different or interrupted builds: re-run `seqpar data prepare`")
        #: int64 [num_docs + 1]: token offset of each document in the flat store.
        self.doc_offsets: np.ndarray = seq_offsets[doc_idx]
        self._doc_lengths = np.diff(self.doc_offsets)
        self._max_token: int | None = None


    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])  # O(1) here

    # -- reading -------------------------------------------------------------------------
    def _read_flat(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the flat store; a copy in the store dtype."""
        if count <= 0:
            return np.empty(0, dtype=self.dtype)
        view = self._ds.bin_reader.read(dtype=self._type, count=int(count),
                                        offset=int(start) * self.dtype.itemsize)
        # Copy: a view would pin megatron's mmap, and its __del__ closes that mmap.
        return np.array(view, copy=True)

    def doc(self, i: int) -> np.ndarray:
        """All tokens of document ``i``: [doc_lengths[i]] in the store dtype."""
        return self.span(i, 0, int(self._doc_lengths[self._check_doc(i)]))

    def span(self, i: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document ``i`` (store dtype), reading only that span."""
        i = self._check_doc(i)
        length = int(self._doc_lengths[i])
        if not 0 <= start <= stop <= length:
            raise IndexError(f"span [{start}, {stop}) is outside document {i} of length {length}")
        return self._read_flat(int(self.doc_offsets[i]) + start, stop - start)

    def _check_doc(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range: {self.prefix} has {self.num_docs}")
        return i

    def max_token_id(self) -> int:
        """Largest token id in the store (-1 if empty); scans the .bin once, then cached."""
        if self._max_token is None:
            best = -1
            for start in range(0, self.num_tokens, _MAX_CHUNK):
                chunk = self._ds.bin_reader.read(
                    dtype=self._type, count=min(_MAX_CHUNK, self.num_tokens - start),
                    offset=start * self.dtype.itemsize)
                best = max(best, int(chunk.max()))
                del chunk
            self._max_token = best
        return self._max_token

    def __reduce__(self) -> tuple:
        # Re-open from the path in another process instead of pickling mmaps.
        return (TokenStore, (self.prefix,))

    def __repr__(self) -> str:
        return (f"TokenStore({self.prefix!r}, num_docs={self.num_docs}, "
                f"num_tokens={self.num_tokens}, dtype={self.dtype})")


def write_store(prefix: str, docs: Iterable[np.ndarray], vocab_size: int) -> dict:
    """Write documents to ``prefix.bin/.idx`` atomically, one Megatron sequence per document.

    The dtype is ``DType.optimal_dtype(vocab_size)`` (uint16 below 65,500, else int32), as in
    Megatron. Files are written under ``prefix.tmp-<pid>`` and moved into place with
    ``os.replace``: the ``.bin`` first, the ``.idx`` last, so a reader never finds an index
    without its data. An empty array is skipped; ``seqpar data prepare`` appends the EOT token to
    every document first, so an empty input document becomes one EOT token (and is skipped only
    with ``--no-eot``).

    Args:
        docs: iterable of integer arrays [n_i]; every id must lie in [0, vocab_size).
    Returns:
        ``{"num_docs": int, "num_tokens": int}`` as written.
    """
    prefix = strip_prefix(prefix)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    mod = megatron_indexed_dataset()
    dtype = mod.DType.optimal_dtype(vocab_size)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    num_docs = num_tokens = 0
    builder = mod.IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        for doc in docs:
            arr = np.asarray(doc).reshape(-1)
            if arr.size == 0:
                continue
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"document {num_docs} has dtype {arr.dtype}; token ids must "
                                 "be integers")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"document {num_docs} has token ids in [{lo}, {hi}], outside "
                                 f"the vocabulary [0, {vocab_size})")
            builder.add_document(arr.astype(dtype, copy=False), [int(arr.size)])
            num_docs += 1
            num_tokens += int(arr.size)
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for path in (tmp + ".bin", tmp + ".idx"):
            if os.path.exists(path):
                os.remove(path)
        raise
    return {"num_docs": num_docs, "num_tokens": num_tokens}
