"""Hugging Face Llama in and out: seqpar's logits on a packed batch equal transformers' logits per
document (fp32, atol 1e-5) for tiny random configs written by transformers itself; round trips are
bitwise; what seqpar writes loads in transformers with the same logits; a sharded index loads."""

import json

import numpy as np
import pytest
import torch
import transformers  # the test extra has it; seqpar never imports it at run time

from seqpar.model.hf import HFConfigError, load_pretrained, model_keys, save_pretrained
from seqpar.train.batch import make_microbatch


BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CONFIGS = {
    "gqa-untied": {},
    "tied": {"tie_word_embeddings": True, "num_key_value_heads": 4},
    "llama3-rope": {"rope_parameters": LLAMA3},
    "head-dim-24": {"head_dim": 24, "num_key_value_heads": 1},
}
DOCS = (7, 1, 23, 2, 31)  # awkward lengths, a 1-token document among them


def _hf_model(tmp_path, name):
    torch.manual_seed(hash(name) % 1000)
    cfg = transformers.LlamaConfig(**{**BASE, **CONFIGS[name]})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a mix-up of the two norms would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    path = tmp_path / name
    model.save_pretrained(path)
    return model, str(path)


def _docs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, BASE["vocab_size"], n) for n in DOCS]


def _seqpar_logits(model, docs):
    cu = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int32)
    mb = make_microbatch(np.concatenate(docs), cu, torch.device("cpu"))
    with torch.no_grad():
        return model(mb.tokens, mb.ctx)


def _hf_logits(model, docs):
    with torch.no_grad():
        return torch.cat([model(torch.as_tensor(d)[None]).logits[0].float() for d in docs])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_per_document(tmp_path, name):
    hf, path = _hf_model(tmp_path, name)
    ours = load_pretrained(path)
    assert ours.cfg.head_dim == CONFIGS[name].get("head_dim", 16)
    assert (ours.output.weight is ours.tok_embeddings.weight) == (name == "tied")
    docs = _docs()
    torch.testing.assert_close(_seqpar_logits(ours, docs), _hf_logits(hf, docs), atol=1e-5, rtol=0)


def _assert_same_model(back, hf):
    """What transformers loaded from our files is the original model: every weight bitwise, and so the
    logits, up to float rounding. Not bitwise logits: transformers (5.24) leaves the weights where
    safetensors mapped them, at addresses that differ from file to file, and the CPU GEMM's path for
    the same numbers depends on alignment (measured: identical weights, logits 1.2e-7 apart)."""
    want = hf.state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    docs = _docs()
    torch.testing.assert_close(_hf_logits(back, docs), _hf_logits(hf, docs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["gqa-untied", "tied", "llama3-rope"])
def test_round_trip_is_bitwise_and_loads_in_transformers(tmp_path, name):
    hf, path = _hf_model(tmp_path, name)
    ours = load_pretrained(path)
    written = save_pretrained(ours, str(tmp_path / "out"))
    assert "config.json" in written and "model.safetensors" in written
    again = load_pretrained(str(tmp_path / "out"))
    assert ours.cfg == again.cfg
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    _assert_same_model(back, hf)
    if name == "tied":  # written once
        from safetensors import safe_open

        with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()


def test_sharded_index_loads(tmp_path):
    hf, path = _hf_model(tmp_path, "gqa-untied")
    ours = load_pretrained(path)
    written = save_pretrained(ours, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    shards = [w for w in written if w.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in written
    docs = _docs()
    torch.testing.assert_close(_seqpar_logits(load_pretrained(str(tmp_path / "sharded")), docs), _seqpar_logits(ours, docs),
                               atol=0, rtol=0)
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "sharded")).eval()
    _assert_same_model(back, hf)


def test_transformers_4_style_rope_scaling_is_read():
    keys = model_keys({**BASE, "num_attention_heads": 4, "rope_theta": 5e5, "rope_scaling": {**LLAMA3, "type": "llama3"}})
    assert keys["rope_scaling"] == "llama3" and keys["rope_theta"] == 5e5 and keys["rope_original_max_positions"] == 16


@pytest.mark.parametrize("change,field", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type='yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "is not a Llama"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
])
def test_unsupported_configs_are_one_line(change, field):
    with pytest.raises(HFConfigError, match=field.replace("[", r"\[")) as e:
        model_keys(json.loads(json.dumps({**BASE, **change})))
    assert "\n" not in str(e.value)
