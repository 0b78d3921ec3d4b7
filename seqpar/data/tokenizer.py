"""Tokenizers: the byte-level default and local Hugging Face ``tokenizer.json`` files.

Both expose the same small surface used by ``prepare`` and the trainer:
``name``, ``vocab_size``, ``eot_id``, ``encode(text) -> int64 [n]`` (no EOT appended)
and ``decode(ids) -> str`` (EOT skipped, undecodable bytes replaced).

Nothing here downloads anything: an ``HFTokenizer`` is always read from a local file.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

#: End-of-text spellings tried, in order, when a tokenizer.json does not name one explicitly.
EOT_CANDIDATES: tuple[str, ...] = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus one end-of-text id 256 (vocab 257)."""

    vocab_size: int = 257
    eot_id: int = 256
    name: str = "byte"
    path: str | None = None

    def encode(self, text: str) -> np.ndarray:
        """Encode ``text`` to its UTF-8 bytes: int64 [num_bytes], no EOT."""
        return self.encode_bytes(text.encode("utf-8")).astype(np.int64)

    @staticmethod
    def encode_bytes(data: bytes) -> np.ndarray:
        """Raw bytes as ids without copying: uint8 [len(data)] (read-only view).

        ``prepare`` uses this on file contents so invalid UTF-8 survives byte-exactly
        and no per-byte Python work happens.
        """
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decode ids to text; EOT (256) is skipped, bad UTF-8 becomes U+FFFD."""
        arr = _as_ids(ids)
        if arr.size and (arr.min() < 0 or arr.max() > self.eot_id):
            raise ValueError(f"byte tokenizer ids must lie in [0, {self.eot_id}]; got "
                             f"min {arr.min()}, max {arr.max()}")
        arr = arr[arr != self.eot_id]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eot_id=256)"


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` package.

    Args:
        path: the ``tokenizer.json`` file (or a directory holding one).
        eot_id: the end-of-text id; when None it is looked up among ``EOT_CANDIDATES``.
    """

    name: str = "hf"

    def __init__(self, path: str, eot_id: int | None = None) -> None:
        from tokenizers import Tokenizer  # light import, kept local so ``byte`` users skip it

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist; pass a local "
                             "tokenizer.json (or a directory containing one)")
        self.path = os.path.abspath(path)
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise ValueError(f"cannot load {self.path} as a Hugging Face tokenizer.json: "
                             f"{exc}") from exc
        self.vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))
        if eot_id is None:
            for tok in EOT_CANDIDATES:
                found = self._tok.token_to_id(tok)
                if found is not None:
                    eot_id = int(found)
                    break
            else:
                raise ValueError(f"{self.path} has none of the end-of-text tokens "
                                 f"{list(EOT_CANDIDATES)}; pass eot_id= explicitly")
        if not 0 <= int(eot_id) < self.vocab_size:
            raise ValueError(f"eot_id={eot_id} is outside the vocabulary [0, {self.vocab_size}) "
                             f"of {self.path}")
        self.eot_id: int = int(eot_id)

    def encode(self, text: str) -> np.ndarray:
        """Encode ``text``: int64 [n], no special tokens added, no EOT."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decode ids to text, skipping EOT."""
        arr = _as_ids(ids)
        return self._tok.decode(arr[arr != self.eot_id].tolist(), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


AnyTokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str = "byte", eot_id: int | None = None) -> AnyTokenizer:
    """Build a tokenizer from a spec string.

    Args:
        spec: ``"byte"``, or a path to a local ``tokenizer.json`` or a directory containing one.
        eot_id: explicit end-of-text id (HF only; the byte tokenizer's is always 256).
    """
    if spec == "byte":
        if eot_id is not None and eot_id != ByteTokenizer.eot_id:
            raise ValueError(f"the byte tokenizer's eot_id is fixed at 256, got eot_id={eot_id}")
        return ByteTokenizer()
    if os.path.isfile(spec) or os.path.isfile(os.path.join(spec, "tokenizer.json")):
        return HFTokenizer(spec, eot_id=eot_id)
    raise ValueError(f"unknown tokenizer {spec!r}: use 'byte' or a path to a local "
                     "tokenizer.json (or a directory containing one)")


def padded_vocab_size(spec: str = "byte") -> int:
    """The tokenizer's vocabulary rounded up to a multiple of 64, as the trainer sizes the embedding
    when ``model.vocab_size`` is 0."""
    return 64 * ((load_tokenizer(spec).vocab_size + 63) // 64)
