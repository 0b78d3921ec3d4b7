"""Weighted blends of stores (Megatron's largest-deficit rule on tokens): the realised token shares
stay within one document of the weights at every stream and step, deterministically; a resumed run continues
the same sequence; stores with different tokenizers are a one-line error."""

import glob
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from seqpar.config import ConfigError, load_config
from seqpar.data.blend import BlendError, parse_blend
from seqpar.data.blend_streams import BlendedStreams
from seqpar.data.streams import PackedStreams
from tests.launcher.test_cli import REPO


@pytest.fixture(scope="module")
def second_store(tmp_path_factory):
    from seqpar.data.prepare import prepare

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "logging", "*.py")))
    prefix = str(tmp_path_factory.mktemp("blend") / "logging")
    prepare(files, prefix, "byte", progress=False)
    return prefix


def test_parse_blend():
    assert parse_blend("data/a") is None and parse_blend("") is None
    assert parse_blend("3 a 1 b") == [(0.75, "a"), (0.25, "b")]
    for bad, match in [("0.3 a 0.7", "alternates weights and paths"), ("0.3 a x b", "'x' is not a weight"),
                       ("0.3 a -1 b", "must be positive")]:
        with pytest.raises(BlendError, match=match):
            parse_blend(bad)


def test_yaml_list_and_bad_blends_in_the_config():
    cfg = load_config("configs/tiny-cpu.yaml", ["data.path=[{weight: 0.3, path: a}, {weight: 0.7, path: b}]"])
    assert cfg.data.path == "0.3 a 0.7 b"
    with pytest.raises(ConfigError, match=r"data.path\[1\]=.* must be a mapping with exactly the keys weight and path"):
        load_config("configs/tiny-cpu.yaml", ["data.path=[{weight: 0.3, path: a}, {w: 0.7, path: b}]"])
    with pytest.raises(ConfigError, match="data.mode=decompose takes one decomposition directory"):
        load_config("configs/tiny-cpu.yaml", ["data.path=0.3 a 0.7 b", "data.mode=decompose"])


@pytest.mark.parametrize("mode", ["pack", "concat_chunk"])
def test_shares_are_exact_up_to_one_document_at_every_stream(small_store, second_store, mode):
    from seqpar.data import blend_streams
    from seqpar.data.store import TokenStore

    stores = [TokenStore(small_store), TokenStore(second_store)]

    def blend():
        return BlendedStreams(stores, [0.3, 0.7], mode=mode, seq_len=256, seed=3)

    b = blend()
    n = 2 * blend_streams.CHUNK + 100  # across chunk boundaries
    tokens = np.zeros(2, dtype=np.int64)
    worst = 0.0
    for i in range(n):
        pieces = b.pieces(i)
        for k, d, start, length in pieces:
            assert 0 <= start and start + length <= stores[k].doc_lengths[d]  # a piece lies in one document
            tokens[k] += length
        # every stream boundary: within one piece (so within one document) of the weights
        longest = max(p[3] for p in pieces)
        err = np.abs(tokens - b.weights * tokens.sum()).max()
        assert err <= max(longest, b.seq_len if mode == "pack" else longest), (i, err)
        worst = max(worst, err)
        if mode == "concat_chunk":
            assert sum(p[3] for p in pieces) == 256  # streams of exactly seq_len tokens
    assert np.array_equal(b.tokens_after(n), tokens)
    assert abs(b.shares(n)[0] - 0.3) <= worst / tokens.sum() + 1e-12
    k, d, s, ln = b.pieces(137)[0]
    assert np.array_equal(b[137].tokens[:ln], stores[k].span(d, s, s + ln))
    again = blend()  # a resumed run: stream i depends only on i, whatever was asked before
    for i in (n - 1, 5, 1100, 300):
        assert again.pieces(i) == b.pieces(i)
        assert np.array_equal(again[i].tokens, b[i].tokens)
    if mode == "pack":
        # every document's tokens appear exactly once per pass: no piece is cut
        assert all(ln == min(256, stores[k].doc_lengths[d] - s) for k, d, s, ln in
                   (p for i in range(200) for p in b.pieces(i)))
        fill = tokens.sum() / (n * 256)
        solo = PackedStreams(second_store, mode="pack", seq_len=256, seed=3)
        solo_fill = TokenStore(second_store).num_tokens / (solo.streams_in_epoch(0) * 256)
        assert fill > solo_fill - 0.05, (fill, solo_fill)  # the deficit rule costs little fill


def test_varlen_blend_is_exact_up_to_one_document_at_every_step(small_store, second_store):
    from seqpar.data.blend import BlendedDocs
    from seqpar.data.store import TokenStore
    from seqpar.data.varlen import VarlenSteps

    stores = [TokenStore(small_store), TokenStore(second_store)]
    docs = BlendedDocs(stores, [0.3, 0.7], seed=5)
    steps = VarlenSteps(docs, seq_len=512, tokens_per_step=4096, seed=5, shuffle=False)
    ep, _ = steps.locate(0)
    tokens = np.zeros(2)
    longest = int(docs.doc_lengths.max())
    for step in range(ep.num_steps):  # every step boundary of the pass
        _, lo, hi = steps._slice(step)
        for d, n in zip(ep.doc[lo:hi], ep.length[lo:hi]):
            tokens[docs.store_of(int(d))[0]] += n
        assert np.abs(tokens - docs.weights * tokens.sum()).max() <= longest
    assert "0.3000 -> 0.3" in docs.shares_line() or "0.3000 -> 0.2" in docs.shares_line()
    again = BlendedDocs(stores, [0.3, 0.7], seed=5)  # deterministic: a resumed run sees the same documents
    assert np.array_equal(again.doc_lengths, docs.doc_lengths) and again.store_of(7) == docs.store_of(7)


def _train(*args, env=None):
    return subprocess.run([sys.executable, "-m", "seqpar.train", "--config", "configs/tiny-cpu.yaml", "parallel.sp=1",
                           "parallel.ring=1", "data.seq_len=256", "data.tokens_per_step=512", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def _losses(run):
    return [json.loads(ln)["loss"] for ln in open(os.path.join(run, "metrics.jsonl"))]


def test_blended_run_prints_shares_and_resumes_on_the_same_curve(tmp_path, small_store, second_store):
    blend = f"data.path=0.3 {small_store} 0.7 {second_store}"
    whole = _train(blend, "train.steps=4", f"run.output_dir={tmp_path}/whole")
    assert whole.returncode == 0, whole.stderr
    assert "blend of 2 stores, weight -> realised token share over the run's 8 streams (" in whole.stdout
    assert "fill): 0.3000 -> " in whole.stdout
    killed = _train(blend, "train.steps=4", "checkpoint.interval=2", f"run.output_dir={tmp_path}/resumed",
                    env={"SEQPAR_FAULT_KILL_AFTER_SAVE": "2"})
    assert killed.returncode != 0
    resumed = _train(blend, "train.steps=4", "checkpoint.interval=2", f"run.output_dir={tmp_path}/resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-6)


def test_stores_with_different_tokenizers_are_one_line(tmp_path, small_store):
    from tests.data.test_tokenizer import _train_bpe

    from seqpar.data.prepare import prepare

    tok = _train_bpe(tmp_path / "tokenizer.json")
    (tmp_path / "t.txt").write_text("hello world " * 200)
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "hf"), tok, progress=False)
    p = _train(f"data.path=0.5 {small_store} 0.5 {tmp_path}/hf", f"run.output_dir={tmp_path}/run")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "was made with tokenizer" in lines[0] and "prepare every store of a blend with one tokenizer" in lines[0]
