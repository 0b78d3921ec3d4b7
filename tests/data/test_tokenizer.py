"""Tokenizers: byte round trip, a locally built tokenizer.json, spec errors."""

import numpy as np
import pytest

from seqpar.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["hello world", "def f(x):\n    return x * 2\n", "naïve café — ünïcödé ✓", ""]


def test_byte_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eot_id, tok.name) == (257, 256, "byte")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int64
        assert ids.tolist() == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode(np.append(ids, tok.eot_id)) == text  # EOT skipped
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # bad UTF-8 replaced, not raised


def _train_bpe(path, with_eot=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] if with_eot else []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_from_local_file(tmp_path):
    path = _train_bpe(tmp_path / "tokenizer.json")
    for spec in (path, str(tmp_path)):  # the file or its directory
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.eot_id == tok._tok.token_to_id("<|endoftext|>")
        assert tok.vocab_size == tok._tok.get_vocab_size(with_added_tokens=True)
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids.dtype == np.int64 and (ids < tok.vocab_size).all()
            assert tok.eot_id not in ids.tolist()
            assert tok.decode(ids) == text
            assert tok.decode(np.append(ids, tok.eot_id)) == text
    assert len(load_tokenizer(path).encode("hello world")) < len("hello world")  # merges learnt


def test_hf_tokenizer_eot_lookup_and_errors(tmp_path):
    path = _train_bpe(tmp_path / "tokenizer.json", with_eot=False)
    with pytest.raises(ValueError, match="eot_id"):
        load_tokenizer(path)
    assert load_tokenizer(path, eot_id=5).eot_id == 5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_tokenizer(path, eot_id=10**6)
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load"):
        load_tokenizer(str(bad))


def test_unknown_spec():
    with pytest.raises(ValueError, match="'byte'") as err:
        load_tokenizer("gpt2")
    assert "tokenizer.json" in str(err.value)
    with pytest.raises(ValueError, match="fixed at 256"):
        load_tokenizer("byte", eot_id=3)


def _two_eot_candidates(folder):
    """A tokenizer.json with both <|endoftext|> (the first candidate) and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_eot_is_the_tokenizers_own_eos_token(tmp_path):
    """Megatron's Hugging Face tokenizer ends documents with the tokenizer's eos_token, which need not
    be the first of the candidates: the store must record the same."""
    import json
    import subprocess
    import sys

    raw = _two_eot_candidates(tmp_path / "tok")
    assert load_tokenizer(str(tmp_path / "tok")).eot_id == raw.token_to_id("<|endoftext|>")  # no config: first candidate
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.eot_id == raw.token_to_id("</s>") and tok.eot_token == "</s>" and "tokenizer_config.json" in tok.eot_source
    (tmp_path / "text.txt").write_text("hello world\n")
    prepare = [sys.executable, "-m", "seqpar.launcher", "data", "prepare", str(tmp_path / "text.txt"), "--tokenizer",
               str(tmp_path / "tok"), "--quiet"]
    p = subprocess.run([*prepare, "--output", str(tmp_path / "a")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    meta = json.loads((tmp_path / "a.json").read_text())
    assert (meta["eot_id"], meta["eot_token"]) == (raw.token_to_id("</s>"), "</s>")
    from seqpar.data.store import TokenStore

    assert TokenStore(str(tmp_path / "a")).doc(0).tolist()[-1] == raw.token_to_id("</s>")
    pad = raw.token_to_id("<pad>")
    p = subprocess.run([*prepare, "--output", str(tmp_path / "b"), "--eot-id", str(pad)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "b.json").read_text())["eot_id"] == pad
    p = subprocess.run([*prepare, "--output", str(tmp_path / "c"), "--eot-token", "<|endoftext|>"], capture_output=True, text=True)
    assert json.loads((tmp_path / "c.json").read_text())["eot_token"] == "<|endoftext|>"
    p = subprocess.run([*prepare, "--output", str(tmp_path / "d"), "--eot-token", "<nope>"], capture_output=True, text=True)
    assert p.returncode == 2 and "end-of-text token '<nope>' is not in" in p.stderr
    (tmp_path / "tok" / "tokenizer_config.json").unlink()
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"eos_token_id": [pad, 1]}))  # a model's config.json
    assert load_tokenizer(str(tmp_path / "tok")).eot_id == pad
