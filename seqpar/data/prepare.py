"""Turn text files, directories and JSON-lines files into a token store.

    seqpar data prepare notes/ book.txt web.jsonl --output data/mix --tokenizer byte

Input kinds, in the order given (directories walked recursively in sorted order):
- a text file is one document (its bytes, decoded as UTF-8 for non-byte tokenizers);
- a ``.jsonl`` / ``.json`` file is JSON lines: one object per non-blank line, one document
  per line, the text under ``jsonl_key``;
- a directory contributes its files (hidden entries and ``__pycache__`` skipped), filtered by
  ``extensions`` when given.
Every document ends with the tokenizer's EOT (``append_eot``), like Megatron's preprocessing.
Beside the store, ``PREFIX.json`` records the tokenizer and sizes; the trainer reads the
vocabulary size and EOT id from it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterator

import numpy as np

from seqpar.data.store import StoreError, strip_prefix, write_store
from seqpar.data.tokenizer import AnyTokenizer, ByteTokenizer, load_tokenizer

LINES_EXTENSIONS: tuple[str, ...] = (".jsonl", ".json")
_SKIP_DIRS = ("__pycache__",)


class PrepareError(ValueError):
    """Bad input to ``prepare``; the message names the file (and line) to fix."""


def _norm_exts(extensions: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if extensions is None:
        return None
    return tuple(e if e.startswith(".") else "." + e for e in extensions)


def collect_files(inputs: list[str], extensions: tuple[str, ...] | None = None,
                  exclude: frozenset[str] = frozenset()) -> list[str]:
    """Expand inputs into a deterministic file list.

    Explicit files are always kept; files found in directories are kept when their name ends
    with one of ``extensions`` (all files when None). Paths in ``exclude`` (absolute) are
    dropped so a store written inside an input directory is not read back into itself.
    """
    exts = _norm_exts(extensions)
    files: list[str] = []
    for inp in inputs:
        if os.path.isdir(inp):
            for root, dirs, names in os.walk(inp):
                # Sorting in place fixes os.walk's descent order, so the result is deterministic.
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
                for name in sorted(names):
                    if name.startswith(".") or (exts is not None and not name.endswith(exts)):
                        continue
                    files.append(os.path.join(root, name))
        elif os.path.isfile(inp):
            files.append(inp)
        else:
            raise PrepareError(f"input {inp!r} does not exist; pass text files, directories "
                               "or .jsonl files")
    return [f for f in files if os.path.abspath(f) not in exclude
            and ".tmp-" not in os.path.basename(f)]


def _read_lines_file(path: str, key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise PrepareError(f"{where}: not valid JSON ({exc}); .jsonl/.json inputs need "
                                   f"one JSON object per line with a {key!r} string "
                                   "(pass extensions= to skip such files in directories)"
                                   ) from exc
            if not isinstance(obj, dict) or key not in obj:
                raise PrepareError(f"{where}: the JSON line has no {key!r} field; set "
                                   "jsonl_key (--jsonl-key) to the field that holds the text")
            text = obj[key]
            if not isinstance(text, str):
                raise PrepareError(f"{where}: field {key!r} is {type(text).__name__}, "
                                   "expected a string")
            yield text


def _with_eot(ids: np.ndarray, eot_id: int | None, dtype: type) -> np.ndarray:
    """Copy ``ids`` into a fresh ``dtype`` array [n (+1)], appending EOT when given."""
    n = ids.size
    out = np.empty(n + (eot_id is not None), dtype=dtype)
    out[:n] = ids
    if eot_id is not None:
        out[n] = eot_id
    return out


def iter_documents(files: list[str], tok: AnyTokenizer, *, jsonl_key: str = "text",
                   append_eot: bool = True) -> Iterator[np.ndarray]:
    """Yield one token array [n (+1 EOT)] per document, in file order."""
    eot = tok.eot_id if append_eot else None
    # uint16 halves the memory traffic of byte-level corpora; ids always fit the vocabulary.
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int64
    for path in files:
        if path.endswith(LINES_EXTENSIONS):
            for text in _read_lines_file(path, jsonl_key):
                yield _with_eot(tok.encode(text), eot, dtype)
            continue
        with open(path, "rb") as f:
            data = f.read()
        if isinstance(tok, ByteTokenizer):
            # Raw bytes, no decode: byte-exact for any file and no per-byte Python work.
            ids = tok.encode_bytes(data)
        else:
            ids = tok.encode(data.decode("utf-8", errors="replace"))
        yield _with_eot(ids, eot, dtype)


def _progress(docs: Iterator[np.ndarray], enabled: bool, total: int | None
              ) -> Iterator[np.ndarray]:
    from tqdm import tqdm

    tokens = 0
    with tqdm(total=total, unit="doc", desc="prepare", file=sys.stderr, disable=not enabled,
              dynamic_ncols=True) as bar:
        for doc in docs:
            tokens += doc.size
            # refresh=False: tqdm redraws on its own interval, not once per document.
            bar.set_postfix_str(f"{tokens / 1e6:.2f}M tokens", refresh=False)
            bar.update(1)
            yield doc


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def prepare(inputs: list[str], output: str, tokenizer: str | AnyTokenizer = "byte", *,
            jsonl_key: str = "text", append_eot: bool = True,
            extensions: tuple[str, ...] | None = None, progress: bool = True) -> dict:
    """Tokenize ``inputs`` into the store ``output.bin/.idx`` plus ``output.json`` metadata.

    Args:
        inputs: text files, directories and ``.jsonl``/``.json`` lines files.
        output: store prefix (a ``.bin``/``.idx`` suffix is ignored).
        tokenizer: ``"byte"`` or a path to a local ``tokenizer.json`` (see ``load_tokenizer``),
            or an already built tokenizer (e.g. ``load_tokenizer(path, eot_id=...)``).
        extensions: keep only files with these endings when walking directories, e.g. (".py",).
        progress: show a tqdm bar on stderr (documents, with a token count).
    Returns:
        ``{"num_docs": int, "num_tokens": int, "output": str}``.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    if not inputs:
        raise PrepareError("no inputs given; pass text files, directories or .jsonl files")
    output = strip_prefix(output)
    own = frozenset(os.path.abspath(output + s) for s in (".bin", ".idx", ".json"))
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    files = collect_files(list(inputs), extensions, exclude=own)
    if not files:
        filt = f" with extensions {list(extensions)}" if extensions else ""
        raise PrepareError(f"no input files{filt} found in {list(inputs)}")
    any_lines = any(f.endswith(LINES_EXTENSIONS) for f in files)
    docs = iter_documents(files, tok, jsonl_key=jsonl_key, append_eot=append_eot)
    stats = write_store(output, _progress(docs, progress, None if any_lines else len(files)),
                        tok.vocab_size)
    if stats["num_docs"] == 0:
        for s in (".bin", ".idx"):
            os.remove(output + s)
        raise PrepareError(f"inputs {list(inputs)} hold no text ({len(files)} files, all empty)")
    from seqpar import __version__

    meta = {
        "tokenizer": tok.name,
        "tokenizer_path": tok.path,
        "tokenizer_spec": tok.path or tok.name,  # what load_tokenizer() takes to rebuild it
        "vocab_size": int(tok.vocab_size),
        "eot_id": int(tok.eot_id),
        "eot_token": getattr(tok, "eot_token", None),  # the HF tokenizer's; None for bytes
        "eot_source": getattr(tok, "eot_source", "byte tokenizer"),
        "append_eot": bool(append_eot),
        "num_docs": stats["num_docs"],
        "num_tokens": stats["num_tokens"],
        "num_files": len(files),
        "format": "megatron-indexed-dataset",
        "seqpar_version": __version__,
    }
    _write_json_atomic(output + ".json", meta)
    return {"num_docs": stats["num_docs"], "num_tokens": stats["num_tokens"], "output": output}


def read_metadata(prefix: str) -> dict | None:
    """The ``PREFIX.json`` written by ``prepare``, or None for stores built elsewhere."""
    path = strip_prefix(prefix) + ".json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"store metadata {path} is not valid JSON ({exc}); re-run "
                         "`seqpar data prepare` or delete the file") from exc
    if not isinstance(meta, dict):
        raise StoreError(f"store metadata {path} is not a JSON object; re-run "
                         "`seqpar data prepare` or delete the file")
    return meta
