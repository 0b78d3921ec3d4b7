"""Open the run's token store and derive the vocabulary, on every rank (building the embedded corpus once)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from seqpar.config import Config, ConfigError


@dataclass
class DataSource:
    prefix: str
    vocab_size: int
    eot_id: int | None
    description: str


def _round_up(n: int, multiple: int) -> int:
    return multiple * ((n + multiple - 1) // multiple)


def open_data(cfg: Config, local_rank: int):
    """Return (TokenStore, DataSource). Collective: local rank 0 builds the embedded corpus first.

    Vocabulary: model.vocab_size when set; otherwise the store's metadata (written by
    ``seqpar data prepare``), else the configured tokenizer, rounded up to a multiple of 64.
    """
    from seqpar.data.store import StoreError, TokenStore

    if cfg.data.path:
        prefix = cfg.data.path
        for suffix in (".bin", ".idx"):
            if prefix.endswith(suffix):
                prefix = prefix[: -len(suffix)]
        if not (os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx")):
            raise ConfigError(
                f"data.path={cfg.data.path!r}: no {prefix}.bin/.idx found; make a store with "
                "'seqpar data prepare INPUT --output PREFIX' or leave data.path empty for the embedded corpus"
            )
        description = prefix
    else:
        from seqpar.data.corpus import embedded_corpus

        cache = cfg.data.cache_dir or None
        if local_rank == 0:
            prefix = embedded_corpus(cache, progress=cfg.logging.progress)
        if dist.is_initialized():
            dist.barrier()
        if local_rank != 0:
            prefix = embedded_corpus(cache, progress=False)
        description = "embedded corpus (Python standard library sources)"
    store = TokenStore(prefix)

    from seqpar.data.prepare import read_metadata

    meta = read_metadata(prefix) or {}
    eot_id = meta.get("eot_id")
    vocab = cfg.model.vocab_size
    if vocab == 0:
        if "vocab_size" in meta:
            vocab = int(meta["vocab_size"])
        else:
            from seqpar.data.tokenizer import load_tokenizer

            tok = load_tokenizer(cfg.data.tokenizer)
            vocab, eot_id = tok.vocab_size, tok.eot_id
        vocab = _round_up(vocab, 64)
    max_id = store.max_token_id()
    if max_id >= vocab:
        raise StoreError(
            f"{prefix}: token id {max_id} does not fit model.vocab_size={vocab}; set model.vocab_size to at least {max_id + 1}"
        )
    return store, DataSource(prefix=prefix, vocab_size=vocab, eot_id=eot_id, description=description)
