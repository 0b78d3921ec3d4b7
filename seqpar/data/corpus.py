"""The embedded default corpus: the running interpreter's own standard-library sources.

Every Python install carries ~30 MB of real, varied, permissively licensed text (the stdlib
``.py`` files: about 1,790 documents, 31.5M byte tokens on CPython 3.11, median ~6.5K, largest
~757K), so ``seqpar train`` works out of the box with no download. The store is built once
(seconds) into a cache directory and reused:

    prefix = embedded_corpus()          # ~/.cache/seqpar/stdlib-py311-<hash>.{bin,idx,json}
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import sysconfig

from seqpar.data.prepare import prepare, read_metadata

_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


def default_cache_dir() -> str:
    """``$SEQPAR_CACHE`` if set, else ``~/.cache/seqpar``."""
    return os.environ.get("SEQPAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "seqpar")


def embedded_corpus_files() -> list[str]:
    """The stdlib ``.py`` files of the running interpreter, in a deterministic (sorted) order."""
    root = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    for dirpath, dirs, names in os.walk(root):
        # Third-party packages live under site-packages; they differ between environments.
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files.extend(os.path.join(dirpath, n) for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise RuntimeError(f"no standard-library .py files under {root}; this interpreter "
                           "ships without sources: pass a dataset explicitly")
    return files


def embedded_corpus_name(files: list[str]) -> str:
    """Store name: Python version + a short hash of the relative file list and sizes.

    A different interpreter (or a patched stdlib) gets its own store instead of silently
    reusing one built from other files.
    """
    root = sysconfig.get_paths()["stdlib"]
    h = hashlib.sha256()
    for path in files:
        h.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\n".encode())
    return f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{h.hexdigest()[:12]}"


def _is_built(prefix: str, num_files: int) -> bool:
    # prepare() writes .bin, then .idx, then .json: the metadata file marks a finished build.
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        return False
    try:
        meta = read_metadata(prefix)
    except ValueError:
        return False
    return meta is not None and meta.get("num_files") == num_files


def embedded_corpus(cache_dir: str | None = None, progress: bool = True) -> str:
    """Return the store prefix of the embedded corpus, building it on first use.

    Byte tokenizer, EOT after every file. Safe to call from many processes at once (e.g. every
    rank of a job): builders serialise on an ``fcntl`` lock file, the first one builds, the
    others wait and then find the finished store. The write itself is atomic.
    """
    files = embedded_corpus_files()
    cache = cache_dir or default_cache_dir()
    prefix = os.path.join(cache, embedded_corpus_name(files))
    if _is_built(prefix, len(files)):
        return prefix
    os.makedirs(cache, exist_ok=True)
    with open(prefix + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_built(prefix, len(files)):  # another process may have built it meanwhile
                if progress:
                    print(f"seqpar: building the embedded corpus ({len(files)} stdlib files) "
                          f"into {prefix} (once)", file=sys.stderr)
                prepare(files, prefix, "byte", progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return prefix
