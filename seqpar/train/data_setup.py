"""The run's data on every rank: which streams each optimizer step trains on.

Two sources share one interface (:class:`StepData`):
- a token store packed into fixed-length streams (``data.mode: pack | concat_chunk``), addressed
  by a global stream index;
- a dataset decomposition (``data.mode: decompose``): each step draws one length bucket and
  trains on ``tokens_per_step / 2^max`` streams of that bucket's pieces, addressed by step;
- variable-length steps (``data.mode: varlen``, ``seqpar.data.varlen``): each step is whole
  documents (cut at ``seq_len``) up to ``tokens_per_step``, addressed by step; the adaptive
  executor plans them, static SP packs them into streams.
All are random access, so a resumed run sees exactly the streams it would have seen; step-
addressed sources read only this dp rank's share.
"""

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


def _vocab(cfg: Config, meta: dict, max_id: int, where: str) -> tuple[int, int | None]:
    """model.vocab_size when set; else the data's metadata; else the tokenizer's; rounded up to 64."""
    from seqpar.data.store import StoreError

    eot_id = meta.get("eot_id")
    vocab = cfg.model.vocab_size
    if cfg.model.init_from and int(meta.get("vocab_size", 0)) > vocab:
        raise StoreError(
            f"{where}: its tokenizer has {meta['vocab_size']} tokens but model.init_from={cfg.model.init_from!r} has "
            f"vocab_size {vocab}; prepare the data with the checkpoint's tokenizer "
            f"(seqpar data prepare ... --tokenizer {os.path.join(cfg.model.init_from, 'tokenizer.json')})"
        )
    if vocab == 0:
        if "vocab_size" in meta:
            vocab = int(meta["vocab_size"])
        else:
            from seqpar.data.tokenizer import load_tokenizer

            tok = load_tokenizer(cfg.data.tokenizer)
            vocab, eot_id = tok.vocab_size, tok.eot_id
        vocab = _round_up(vocab, 64)
    if max_id >= vocab:
        raise StoreError(
            f"{where}: token id {max_id} does not fit model.vocab_size={vocab}; set model.vocab_size to at least {max_id + 1}"
        )
    return vocab, eot_id


class StepData:
    """Streams of each step. ``rank_streams`` gives this dp rank's share, in micro-batch order."""

    def __init__(self, source, per_step: int, by_step: bool) -> None:
        self.source = source
        self.per_step = per_step
        self.by_step = by_step

    def rank_streams(self, step: int, consumed: int, dp_rank: int, dp: int) -> list:
        """step: 0-based optimizer step; consumed: global streams used before it (pack modes)."""
        if self.by_step:
            return self.source.rank_streams(step, dp_rank, dp)
        per_rank = self.per_step // dp
        base = consumed + dp_rank * per_rank
        return [self.source[i] for i in range(base, base + per_rank)]

    @property
    def bucketed(self) -> bool:
        """Every step draws one length bucket (decompose): ranks must agree on it."""
        return hasattr(self.source, "step_bucket")

    def describe(self) -> str:
        return self.source.describe()


def check_data_path(cfg: Config) -> None:
    """What the launcher checks before any rank starts: ``data.path`` names a readable store (or a
    decomposition for ``data.mode=decompose``). Raises ConfigError / StoreError, one line."""
    if not cfg.data.path:
        return
    if cfg.data.mode == "decompose":
        if not os.path.isdir(cfg.data.path):
            raise ConfigError(f"data.path={cfg.data.path!r} is not a directory; data.mode=decompose needs the output of "
                              "'seqpar data decompose STORE --output DIR'")
        from seqpar.data.decompose import load_manifest

        load_manifest(cfg.data.path)
        return
    from seqpar.data.store import TokenStore

    blend = _blend(cfg)
    for _, path in blend or [(1.0, _store_prefix(cfg, 0)[0])]:
        TokenStore(path)  # reads the index header: a truncated or foreign .idx fails here, not on 64 ranks


def _store_prefix(cfg: Config, local_rank: int) -> tuple[str, str]:
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
        return prefix, prefix
    from seqpar.data.corpus import embedded_corpus

    cache = cfg.data.cache_dir or None
    if local_rank == 0:
        prefix = embedded_corpus(cache, progress=cfg.logging.progress)
    if dist.is_initialized():
        dist.barrier()
    if local_rank != 0:
        prefix = embedded_corpus(cache, progress=False)
    return prefix, "embedded corpus (Python standard library sources)"


def _decomposed(cfg: Config, per_step_tokens: int) -> tuple[StepData, DataSource]:
    from seqpar.data.curriculum import DecomposedBatches
    from seqpar.data.decompose import load_manifest

    if not os.path.isdir(cfg.data.path):
        raise ConfigError(
            f"data.path={cfg.data.path!r} is not a directory; data.mode=decompose needs the output of "
            "'seqpar data decompose STORE --output DIR'"
        )
    manifest = load_manifest(cfg.data.path)
    max_log2 = int(manifest["settings"]["max_log2"]) if "settings" in manifest else int(manifest["max_log2"])
    window = 2**max_log2
    if cfg.data.seq_len != window:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must equal 2^max_log2 = {window} of the decomposition in {cfg.data.path} "
            "(every step then has tokens_per_step targets whatever the bucket)"
        )
    base_batch = per_step_tokens // window
    batches = DecomposedBatches(
        cfg.data.path,
        base_batch=base_batch,
        curriculum=cfg.data.curriculum_odds(),
        rule=cfg.data.curriculum_rule,
        cycles=cfg.data.cycles,
        seed=cfg.run.seed,
        num_steps=cfg.train.steps,
    )
    vocab, eot = _vocab(cfg, manifest, int(manifest.get("max_token_id", -1)), cfg.data.path)
    source = DataSource(cfg.data.path, vocab, eot, f"decomposition {cfg.data.path}")
    return StepData(batches, base_batch, by_step=True), source


def _blend(cfg: Config) -> list[tuple[float, str]] | None:
    from seqpar.data.blend import parse_blend

    return parse_blend(cfg.data.path) if cfg.data.path else None


def _blended(cfg: Config, blend: list[tuple[float, str]]) -> tuple[StepData, DataSource]:
    """Streams of a weighted blend of stores (``seqpar.data.blend``); the stores must share a tokenizer."""
    from seqpar.data.blend_streams import BlendedStreams
    from seqpar.data.prepare import read_metadata
    from seqpar.data.store import StoreError, TokenStore

    stores: list[TokenStore] = []
    first: tuple = ()
    for _, path in blend:
        store = TokenStore(path)
        meta = read_metadata(store.prefix) or {}
        tok = (meta.get("tokenizer_spec"), meta.get("vocab_size"), meta.get("eot_id"))
        if stores and tok != first:
            raise StoreError(f"data.path blend: {store.prefix} was made with tokenizer {tok[0]!r} (vocab {tok[1]}, "
                             f"end-of-text {tok[2]}) but {stores[0].prefix} with {first[0]!r} (vocab {first[1]}, "
                             f"end-of-text {first[2]}); prepare every store of a blend with one tokenizer")
        first = first or tok
        stores.append(store)
    names = [s.prefix for s in stores]
    max_id = max(store.max_token_id() for store in stores)
    vocab, eot = _vocab(cfg, read_metadata(names[0]) or {}, max_id, names[0])
    if cfg.data.mode == "varlen":  # documents in deficit order, dealt into steps in that order
        from seqpar.data.blend import BlendedDocs
        from seqpar.data.varlen import VarlenSteps

        docs = BlendedDocs(stores, [w for w, _ in blend], cfg.run.seed)
        steps = VarlenSteps(docs, seq_len=cfg.data.seq_len, tokens_per_step=cfg.data.tokens_per_step, seed=cfg.run.seed,
                            shuffle=False)
        return StepData(steps, 0, by_step=True), DataSource(cfg.data.path, vocab, eot, docs.shares_line())
    streams = BlendedStreams(stores, [w for w, _ in blend], mode=cfg.data.mode, seq_len=cfg.data.seq_len,
                             seed=cfg.run.seed, doc_mask=cfg.data.doc_mask, names=names)
    run_streams = cfg.train.steps * cfg.data.streams_per_step
    return (StepData(streams, cfg.data.streams_per_step, by_step=False),
            DataSource(cfg.data.path, vocab, eot, streams.shares_line(run_streams)))


def open_data(cfg: Config, local_rank: int) -> tuple[StepData, DataSource]:
    """The run's StepData and vocabulary. Collective: local rank 0 builds the embedded corpus first."""
    if cfg.data.mode == "decompose":
        return _decomposed(cfg, cfg.data.tokens_per_step)
    blend = _blend(cfg)
    if blend is not None:
        return _blended(cfg, blend)
    from seqpar.data.prepare import read_metadata
    from seqpar.data.store import TokenStore
    from seqpar.data.streams import PackedStreams

    prefix, description = _store_prefix(cfg, local_rank)
    store = TokenStore(prefix)
    vocab, eot = _vocab(cfg, read_metadata(prefix) or {}, store.max_token_id(), prefix)
    description = f"{description}: {store.num_docs:,} docs, {store.num_tokens:,} tokens"
    if cfg.data.mode == "varlen":
        from seqpar.data.varlen import VarlenSteps

        steps = VarlenSteps(store, seq_len=cfg.data.seq_len, tokens_per_step=cfg.data.tokens_per_step, seed=cfg.run.seed)
        return StepData(steps, 0, by_step=True), DataSource(prefix, vocab, eot, description)
    streams = PackedStreams(store, mode=cfg.data.mode, seq_len=cfg.data.seq_len, seed=cfg.run.seed, doc_mask=cfg.data.doc_mask)
    return StepData(streams, cfg.data.streams_per_step, by_step=False), DataSource(prefix, vocab, eot, description)
