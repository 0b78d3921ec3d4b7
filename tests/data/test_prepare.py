"""prepare(): text files, directories and JSON lines -> store; read back two ways."""

import json
import os

import numpy as np
import pytest

from seqpar.data.prepare import PrepareError, prepare, read_metadata
from seqpar.data.store import TokenStore, megatron_indexed_dataset
from seqpar.data.tokenizer import load_tokenizer

EOT = 256


def _check_store(prefix, expected_docs):
    """TokenStore and megatron's own IndexedDataset both return expected_docs (ids + EOT)."""
    store = TokenStore(prefix)
    assert store.num_docs == len(expected_docs)
    assert store.doc_lengths.dtype == np.int64
    assert store.doc_lengths.tolist() == [len(d) for d in expected_docs]
    assert store.num_tokens == sum(len(d) for d in expected_docs)
    for i, doc in enumerate(expected_docs):
        assert store.doc(i).tolist() == list(doc)
    ds = megatron_indexed_dataset().IndexedDataset(prefix, mmap=True)
    assert len(ds) == len(expected_docs)
    assert ds.document_indices.tolist() == list(range(len(expected_docs) + 1))
    for i, doc in enumerate(expected_docs):
        assert ds[i].tolist() == list(doc)
    return store


def test_text_files_and_metadata(tmp_path, capsys):
    texts = [b"first document\n", "caf\u00e9 \u2713".encode(), b"bad utf8 \xff\xfe ok", b""]
    paths = []
    for i, data in enumerate(texts):
        paths.append(tmp_path / f"f{i}.txt")
        paths[-1].write_bytes(data)
    out = str(tmp_path / "out" / "store")
    stats = prepare([str(p) for p in paths], out, "byte", progress=True)
    assert stats == {"num_docs": 4, "num_tokens": sum(len(t) + 1 for t in texts), "output": out}
    assert "prepare" in capsys.readouterr().err  # the tqdm bar went to stderr
    store = _check_store(out, [list(t) + [EOT] for t in texts])  # raw bytes kept exactly
    assert store.dtype == np.uint16 and store.max_token_id() == EOT
    meta = read_metadata(out + ".bin")
    assert meta["tokenizer"] == meta["tokenizer_spec"] == "byte"
    assert meta["vocab_size"] == 257 and meta["eot_id"] == EOT
    assert meta["num_docs"] == 4 and meta["num_tokens"] == stats["num_tokens"]
    assert meta["seqpar_version"]
    assert read_metadata(str(tmp_path / "nothing")) is None
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp-" in f]  # atomic, cleaned up


def test_directory_walk(tmp_path):
    root = tmp_path / "src"
    files = {"b.py": "b", "a.py": "a", "pkg/z.py": "z", "pkg/m.txt": "m", "pkg/sub/c.py": "c",
             ".hidden/h.py": "h", "pkg/__pycache__/x.py": "x", ".dot.py": "dot"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    out = str(tmp_path / "dir")
    prepare([str(root)], out, progress=False)
    # Sorted walk: files of a directory, then its subdirectories in order.
    _check_store(out, [[ord(c), EOT] for c in "abmzc"])
    prepare([str(root)], out, extensions=(".py",), progress=False)
    _check_store(out, [[ord(c), EOT] for c in "abzc"])
    # A store written inside its own input directory is not read back into itself.
    inner = str(root / "self")
    first = prepare([str(root)], inner, extensions=("py",), progress=False)
    again = prepare([str(root)], inner, progress=False)
    assert again["num_docs"] == first["num_docs"] + 1  # + m.txt, not self.bin/.idx/.json


def test_jsonl_with_hf_tokenizer(tmp_path):
    from tests.data.test_tokenizer import _train_bpe

    tok_path = _train_bpe(tmp_path / "tokenizer.json")
    rows = ["hello world", "def f(x):\n    return x * 2\n", "caf\u00e9"]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(rows)]
    src = tmp_path / "data.jsonl"
    src.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # blank line ignored
    out = str(tmp_path / "hf")
    stats = prepare([str(src)], out, tok_path, progress=False)
    tok = load_tokenizer(tok_path)
    expected = [tok.encode(t).tolist() + [tok.eot_id] for t in rows]
    store = _check_store(out, expected)
    assert stats["num_docs"] == 3
    assert [tok.decode(store.doc(i)) for i in range(3)] == rows
    meta = read_metadata(out)
    assert meta["tokenizer_path"] == meta["tokenizer_spec"] == os.path.abspath(tok_path)
    assert (meta["vocab_size"], meta["eot_id"]) == (tok.vocab_size, tok.eot_id)
    # Another key, and no EOT.
    src2 = tmp_path / "other.json"
    src2.write_text(json.dumps({"body": "abc"}) + "\n")
    prepare([str(src2)], out, jsonl_key="body", append_eot=False, progress=False)
    _check_store(out, [list(b"abc")])
    # A tokenizer object (e.g. with an explicit eot_id) is accepted as well.
    prepare([str(src)], out, load_tokenizer(tok_path, eot_id=7), progress=False)
    assert read_metadata(out)["eot_id"] == 7
    assert TokenStore(out).doc(0)[-1] == 7


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json}\n')
    with pytest.raises(PrepareError, match=r"bad\.jsonl:3: not valid JSON"):
        prepare([str(src)], str(tmp_path / "o"), progress=False)
    src.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(PrepareError, match=r"bad\.jsonl:2: .*'text'"):
        prepare([str(src)], str(tmp_path / "o"), progress=False)
    src.write_text('{"text": 3}\n')
    with pytest.raises(PrepareError, match=r"bad\.jsonl:1: .*expected a string"):
        prepare([str(src)], str(tmp_path / "o"), progress=False)
    assert not list(tmp_path.glob("o*"))  # nothing half-written


def test_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no input files"):
        prepare([str(tmp_path / "empty")], str(tmp_path / "o"), progress=False)
    with pytest.raises(PrepareError, match="no inputs"):
        prepare([], str(tmp_path / "o"), progress=False)
    with pytest.raises(PrepareError, match="does not exist"):
        prepare([str(tmp_path / "missing.txt")], str(tmp_path / "o"), progress=False)
    (tmp_path / "empty" / "e.txt").write_text("")
    with pytest.raises(PrepareError, match="hold no text"):
        prepare([str(tmp_path / "empty")], str(tmp_path / "o"), append_eot=False,
                progress=False)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prepare([str(tmp_path / "empty")], str(tmp_path / "o"), "nope", progress=False)
