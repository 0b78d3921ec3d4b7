"""``model.init_from``: training starts from a Hugging Face Llama's weights, each rank reading its
own rows; 2 gloo ranks with FSDP start from the one-process loss."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers  # the test extra has it; seqpar never imports it at run time

from tests.launcher.test_cli import REPO


# the shapes of configs/tiny-cpu.yaml, so that the run's config does not conflict
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=352,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
RUN = ["configs/tiny-cpu.yaml", "train.steps=2", "data.seq_len=256", "data.tokens_per_step=512"]


def _hf(path, vocab):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **TINY)).save_pretrained(path)
    return str(path)


def _train(*args, launcher=False):
    if launcher:
        cmd = [sys.executable, "-m", "seqpar.launcher", "train", *args]
    else:
        cmd = [sys.executable, "-m", "seqpar.train", "--config", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _losses(run):
    return [json.loads(ln)["loss"] for ln in open(os.path.join(run, "metrics.jsonl"))]


def test_two_fsdp_ranks_start_from_the_one_process_loss(tmp_path, small_store):
    hf = _hf(tmp_path / "hf", 320)
    common = [*RUN, f"data.path={small_store}"]
    one = _train(*common, "parallel.sp=1", "parallel.ring=1", f"model.init_from={hf}", f"run.output_dir={tmp_path}/one")
    assert one.returncode == 0, one.stderr
    two = _train(*common, f"model.init_from={hf}", f"run.output_dir={tmp_path}/two", "--nproc", "2", launcher=True)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "fsdp on" in two.stdout
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-6)
    scratch = _train(*common, "parallel.sp=1", "parallel.ring=1", "model.vocab_size=320", f"run.output_dir={tmp_path}/scratch")
    assert scratch.returncode == 0, scratch.stderr
    assert abs(_losses(tmp_path / "scratch")[0] - _losses(tmp_path / "one")[0]) > 1e-3  # the weights were loaded
    saved = (tmp_path / "one" / "config.yaml").read_text()
    assert f"init_from: {hf}" in saved and "vocab_size: 320" in saved  # the resolved shapes are the checkpoint's

    # and back: the trained 2-rank FSDP checkpoint as a Hugging Face model, with seqpar's logits
    p = subprocess.run([sys.executable, "-m", "seqpar.launcher", "export", "hf", str(tmp_path / "two"), "--output",
                        str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "wrote" in p.stdout and p.stderr.strip() == "", p.stderr
    from seqpar.model.hf import load_checkpoint_model

    ours = load_checkpoint_model(str(tmp_path / "two"))
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.arange(0, 300, 7)
    from seqpar.train.batch import make_microbatch

    mb = make_microbatch(tokens.numpy(), torch.tensor([0, len(tokens)], dtype=torch.int32).numpy(), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(ours(mb.tokens, mb.ctx), back(tokens[None]).logits[0], atol=1e-5, rtol=0)


def test_conflicting_key_and_vocabulary_are_one_line(tmp_path, small_store):
    hf = _hf(tmp_path / "hf", 320)
    p = _train(*RUN, f"model.init_from={hf}", "model.dim=64", f"run.output_dir={tmp_path}/a")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "model.dim=64 conflicts with model.init_from=" in lines[0]
    small = _hf(tmp_path / "small", 200)
    p = _train(*RUN, "parallel.sp=1", "parallel.ring=1", f"data.path={small_store}", f"model.init_from={small}",
               f"run.output_dir={tmp_path}/b")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "its tokenizer has 257 tokens but model.init_from=" in lines[0] and "vocab_size 200" in lines[0]
    p = _train(*RUN, f"model.init_from={tmp_path}/nothing", f"run.output_dir={tmp_path}/c")
    assert p.returncode == 2 and "config.json not found" in p.stderr
