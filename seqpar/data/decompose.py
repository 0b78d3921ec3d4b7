"""Dataset decomposition: split every document into power-of-two pieces, one store per length.

    seqpar data decompose data/mystore --min-log2 8 --max-log2 13 --output data/mystore-dd

Rule (``shared/specs/dataset-decomposition.md``, after Apple's "Dataset Decomposition"): while
more than one token of the document remains, ``k = floor(log2(len - 1))``; below ``min_log2``
the rest is dropped; above ``max_log2`` ``k`` is drawn from ``min..max`` with
``P(k) ~ 2^(max - k)`` (``randomize``, equal expected tokens per bucket) or set to ``max``. The
first ``2^k + 1`` tokens (``2^k`` targets) go to bucket ``k``. With ``overlap`` (default,
lossless) the next piece starts at the last token of this one, so the pieces' target counts
are the binary expansion of ``L - 1``; without it (the released scripts) it starts after the
piece and one target is lost per cut.

Documents are used exactly as stored (stores from ``seqpar data prepare`` and Megatron's
``--append-eod`` already end every document with EOT; none is added). Megatron stores are read
by document (their document index), never by sentence.

Output directory: ``bucket_{k:02d}.bin/.idx`` (one Megatron sequence per piece, in document
order; the sampler shuffles; no files for an empty bucket) and ``manifest.json`` (written last).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import numpy as np

from seqpar.data.store import StoreError, TokenStore, write_store

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_RERUN = "re-run `seqpar data decompose STORE --output DIR`"


class DecomposeError(StoreError):
    """A decomposition directory is missing, corrupt or inconsistent; re-run the decompose."""


def bucket_prefix(output_dir: str, k: int) -> str:
    """``output_dir/bucket_{k:02d}``: the store of pieces with ``2^k + 1`` tokens."""
    return os.path.join(output_dir, f"bucket_{k:02d}")


def _check_range(min_log2: int, max_log2: int) -> None:
    if not 0 <= min_log2 <= max_log2 <= 40:
        raise ValueError(f"need 0 <= min_log2 <= max_log2 <= 40, got min_log2={min_log2}, "
                         f"max_log2={max_log2}; e.g. --min-log2 8 --max-log2 13")


def split_document(length: int, min_log2: int, max_log2: int, *, overlap: bool = True,
                   randomize: bool = True, rng: np.random.Generator | None = None
                   ) -> tuple[list[tuple[int, int, int]], int]:
    """Split a document of ``length`` tokens by the decomposition rule.

    Args:
        length: tokens in the document (EOT included), >= 0.
        overlap: next piece starts at the previous piece's last token (lossless) or after it.
        randomize: draw the bucket of a too-long remainder (P(k) ~ 2^(max-k)) instead of max.
        rng: source of the draws; None means ``default_rng(0)`` (deterministic per call).
    Returns:
        (pieces, dropped): pieces as ``(start, stop, k)`` token ranges in document order with
        ``stop - start == 2^k + 1``; ``dropped`` = targets of the document (``length - 1``) in
        no piece, so ``sum(2^k) + dropped == max(length - 1, 0)`` in both modes.
    """
    _check_range(min_log2, max_log2)
    if randomize and rng is None:
        rng = np.random.default_rng(0)
    # P(k) ~ 2^(max - k) over k = max..min (the released scripts' order), as a CDF
    cdf = np.cumsum(2.0 ** np.arange(max_log2 - min_log2 + 1))
    cdf /= cdf[-1]
    pieces: list[tuple[int, int, int]] = []
    pos, targets = 0, 0
    while length - pos > 1:
        k = int(math.floor(math.log2(length - pos - 1)))
        if k < min_log2:
            break
        if k > max_log2:
            k = (max_log2 - int(np.searchsorted(cdf, rng.random(), side="right"))
                 if randomize else max_log2)
        stop = pos + (1 << k) + 1
        pieces.append((pos, stop, k))
        targets += 1 << k
        pos = stop - 1 if overlap else stop
    return pieces, max(length - 1, 0) - targets


def _source_checksum(store: TokenStore) -> dict:
    h = hashlib.sha256()
    with open(store.idx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"prefix": os.path.abspath(store.prefix),
            "idx_bytes": os.path.getsize(store.idx_path),
            "bin_bytes": os.path.getsize(store.bin_path),
            "idx_sha256": h.hexdigest(),
            "num_docs": store.num_docs, "num_tokens": store.num_tokens}


def _plan(lengths: np.ndarray, min_log2: int, max_log2: int, overlap: bool, randomize: bool,
          seed: int) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Pieces of every document: {k: (doc int64 [n_k], start int64 [n_k])}, dropped targets."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x44D]))
    docs: dict[int, list[int]] = {k: [] for k in range(min_log2, max_log2 + 1)}
    starts: dict[int, list[int]] = {k: [] for k in range(min_log2, max_log2 + 1)}
    dropped = 0
    for d, length in enumerate(lengths.tolist()):
        pieces, lost = split_document(length, min_log2, max_log2, overlap=overlap,
                                      randomize=randomize, rng=rng)
        dropped += lost
        for start, _, k in pieces:
            docs[k].append(d)
            starts[k].append(start)
    plan = {k: (np.asarray(docs[k], dtype=np.int64), np.asarray(starts[k], dtype=np.int64))
            for k in docs}
    return plan, dropped


def decompose_store(store_prefix: str, output_dir: str, *, min_log2: int = 8,
                    max_log2: int = 13, overlap: bool = True, randomize: bool = True,
                    seed: int = 0, progress: bool = True) -> dict:
    """Decompose a token store into per-bucket stores plus ``manifest.json``; return the manifest.

    Deterministic from ``seed``. The bucket stores use the source's vocabulary (``PREFIX.json``
    of ``seqpar data prepare``; for Megatron stores without one, the largest token id + 1).
    """
    from tqdm import tqdm

    from seqpar.data.prepare import read_metadata

    _check_range(min_log2, max_log2)
    store = TokenStore(store_prefix)
    meta = read_metadata(store.prefix) or {}
    max_id = store.max_token_id()
    vocab = int(meta.get("vocab_size", max_id + 1))
    eot = meta.get("eot_id")
    plan, dropped = _plan(store.doc_lengths, min_log2, max_log2, overlap, randomize, seed)
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, MANIFEST)
    if os.path.exists(manifest_path):  # an interrupted re-run must not look finished
        os.remove(manifest_path)
    total = sum(int(d.size) for d, _ in plan.values())
    buckets = []
    with tqdm(total=total, unit="piece", desc="decompose", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for k, (docs, starts) in plan.items():
            size = (1 << k) + 1

            def pieces(docs=docs, starts=starts, size=size):
                for d, s in zip(docs.tolist(), starts.tolist()):
                    bar.update(1)
                    yield store.span(d, s, s + size)

            prefix = bucket_prefix(output_dir, k)
            if docs.size:
                stats = write_store(prefix, pieces(), vocab)
                assert stats["num_docs"] == docs.size, (stats, docs.size)
            else:  # megatron cannot map an empty .bin: an empty bucket has no files
                for suffix in (".bin", ".idx"):
                    if os.path.exists(prefix + suffix):
                        os.remove(prefix + suffix)
            buckets.append({"k": k, "file": os.path.basename(bucket_prefix(output_dir, k)),
                            "pieces": int(docs.size), "tokens": int(docs.size) * size,
                            "targets": int(docs.size) << k})
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": {"min_log2": min_log2, "max_log2": max_log2, "overlap": bool(overlap),
                     "randomize": bool(randomize), "seed": int(seed)},
        "source": _source_checksum(store),
        "source_targets": int(np.maximum(store.doc_lengths - 1, 0).sum()),
        "buckets": buckets,
        "dropped_targets": int(dropped),
        "vocab_size": vocab,
        "vocab_from": "metadata" if "vocab_size" in meta else "max_token_id",
        "eot_id": None if eot is None else int(eot),
        "max_token_id": int(max_id),
    }
    tmp = f"{manifest_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, manifest_path)
    return manifest


def load_manifest(output_dir: str) -> dict:
    """Read and validate ``output_dir/manifest.json`` against its bucket stores.

    Raises:
        DecomposeError (a StoreError) naming the file for a missing manifest, invalid JSON, an
        unknown version, or a bucket store that is missing or disagrees with the manifest.
    """
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DecomposeError(f"decomposition manifest {path} is missing; {_RERUN}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecomposeError(f"decomposition manifest {path} is not valid JSON ({exc}); "
                             f"{_RERUN}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise DecomposeError(f"decomposition manifest {path} has unknown version {version!r} "
                             f"(this seqpar reads version {MANIFEST_VERSION}); {_RERUN}")
    try:
        settings = manifest["settings"]
        lo, hi = int(settings["min_log2"]), int(settings["max_log2"])
        buckets = {int(b["k"]): b for b in manifest["buckets"]}
        for b in buckets.values():
            int(b["pieces"]), int(b["tokens"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DecomposeError(f"decomposition manifest {path} lacks a field ({exc!r}); "
                             f"{_RERUN}") from exc
    if sorted(buckets) != list(range(lo, hi + 1)):
        raise DecomposeError(f"decomposition manifest {path} lists buckets {sorted(buckets)}, "
                             f"not {lo}..{hi}; {_RERUN}")
    for k, b in buckets.items():
        prefix = bucket_prefix(output_dir, k)
        if int(b["pieces"]) == 0 and int(b["tokens"]) == 0:
            continue  # empty buckets have no files
        try:
            store = TokenStore(prefix)
        except StoreError as exc:
            raise DecomposeError(f"bucket store {prefix}.bin/.idx of {path} is unreadable "
                                 f"({exc}); {_RERUN}") from exc
        size = (1 << k) + 1
        if (store.num_docs != int(b["pieces"]) or store.num_tokens != int(b["tokens"])
                or np.any(store.doc_lengths != size)):
            raise DecomposeError(
                f"bucket store {prefix}.idx has {store.num_docs} pieces / {store.num_tokens} "
                f"tokens but manifest {path} says {b['pieces']} / {b['tokens']} (pieces of "
                f"{size} tokens): mismatched manifest; {_RERUN}")
    return manifest


def bucket_pieces(manifest: dict) -> dict[int, int]:
    """{k: pieces in bucket k} of a manifest, shortest bucket first."""
    return {int(b["k"]): int(b["pieces"]) for b in sorted(manifest["buckets"],
                                                          key=lambda b: int(b["k"]))}


def format_summary(manifest: dict) -> str:
    """Per-bucket table of a manifest, for the CLI."""
    lines = [f"{'bucket':>8} {'length':>9} {'pieces':>11} {'tokens':>15} {'share':>7}"]
    total = sum(int(b["targets"]) for b in manifest["buckets"]) or 1
    for b in sorted(manifest["buckets"], key=lambda b: int(b["k"])):
        k = int(b["k"])
        lines.append(f"{k:>8} {(1 << k) + 1:>9,} {b['pieces']:>11,} {b['tokens']:>15,} "
                     f"{int(b['targets']) / total:>7.1%}")
    src = max(int(manifest.get("source_targets", 0)), 1)
    lines.append(f"dropped targets: {manifest['dropped_targets']:,} "
                 f"({manifest['dropped_targets'] / src:.2%} of {src:,})")
    return "\n".join(lines)
