"""Tokenizers: the byte-level default and local Hugging Face ``tokenizer.json`` files.

Both expose the same small surface used by ``prepare`` and the trainer:
``name``, ``vocab_size``, ``eot_id``, ``encode(text) -> int64 [n]`` (no EOT appended)
and ``decode(ids) -> str`` (EOT skipped, undecodable bytes replaced).

Nothing here downloads anything: an ``HFTokenizer`` is always read from a local file.
"""

from __future__ import annotations

import json
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

    def __init__(self, path: str, eot_id: int | None = None, eot_token: str | None = None) -> None:
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
        self.eot_source = "given id"
        if eot_id is None and eot_token is not None:
            eot_id = self._tok.token_to_id(eot_token)
            if eot_id is None:
                raise ValueError(f"end-of-text token {eot_token!r} is not in {self.path}")
            self.eot_source = "given token"
        if eot_id is None:
            eot_id, self.eot_source = self._configured_eos()
        if eot_id is None:
            for tok in EOT_CANDIDATES:
                found = self._tok.token_to_id(tok)
                if found is not None:
                    eot_id, self.eot_source = int(found), f"first of {list(EOT_CANDIDATES)}"
                    break
            else:
                raise ValueError(f"{self.path} has none of the end-of-text tokens "
                                 f"{list(EOT_CANDIDATES)}; pass eot_id= explicitly")
        if not 0 <= int(eot_id) < self.vocab_size:
            raise ValueError(f"eot_id={eot_id} is outside the vocabulary [0, {self.vocab_size}) "
                             f"of {self.path}")
        self.eot_id: int = int(eot_id)

    def _configured_eos(self) -> tuple[int | None, str]:
        """The tokenizer's own end-of-sequence token, as Megatron's Hugging Face tokenizer sees it:
        ``tokenizer_config.json``'s ``eos_token`` beside the ``tokenizer.json``, else the model's
        ``config.json``'s ``eos_token_id`` (the first, when it is a list)."""
        folder = os.path.dirname(self.path)
        tc = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(tc):
            with open(tc) as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):  # {"content": "</s>", ...}
                eos = eos.get("content")
            if isinstance(eos, str) and self._tok.token_to_id(eos) is not None:
                return int(self._tok.token_to_id(eos)), f"eos_token of {tc}"
        mc = os.path.join(folder, "config.json")
        if os.path.isfile(mc):
            with open(mc) as f:
                eos_id = json.load(f).get("eos_token_id")
            if isinstance(eos_id, list):
                eos_id = eos_id[0] if eos_id else None
            if isinstance(eos_id, int):
                return eos_id, f"eos_token_id of {mc}"
        return None, ""

    @property
    def eot_token(self) -> str | None:
        return self._tok.id_to_token(self.eot_id)

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


def load_tokenizer(spec: str = "byte", eot_id: int | None = None, eot_token: str | None = None) -> AnyTokenizer:
    """Build a tokenizer from a spec string.

    Args:
        spec: ``"byte"``, or a path to a local ``tokenizer.json`` or a directory containing one.
        eot_id, eot_token: the end-of-text token (HF only; the byte tokenizer's is always 256). By
            default a ``tokenizer.json``'s is its own ``eos_token`` (``tokenizer_config.json`` beside
            it, else ``config.json``'s ``eos_token_id``), else the first of ``EOT_CANDIDATES``.
    """
    if spec == "byte":
        if (eot_id is not None and eot_id != ByteTokenizer.eot_id) or eot_token is not None:
            raise ValueError(f"the byte tokenizer's end-of-text id is fixed at 256, got {eot_token or eot_id!r}")
        return ByteTokenizer()
    if os.path.isfile(spec) or os.path.isfile(os.path.join(spec, "tokenizer.json")):
        return HFTokenizer(spec, eot_id=eot_id, eot_token=eot_token)
    raise ValueError(f"unknown tokenizer {spec!r}: use 'byte' or a path to a local "
                     "tokenizer.json (or a directory containing one)")


def padded_vocab_size(spec: str = "byte") -> int:
    """The tokenizer's vocabulary rounded up to a multiple of 64, as the trainer sizes the embedding
    when ``model.vocab_size`` is 0."""
    return 64 * ((load_tokenizer(spec).vocab_size + 63) // 64)
