import numpy as np
import pytest
import torch

from seqpar.attention import build_attention
from seqpar.config import ModelConfig
from seqpar.model.flops import attention_pairs, matmul_params, train_flops
from seqpar.model.llama import Transformer, apply_rope, rope_tables
from seqpar.train.batch import make_microbatch

CFG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64)


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG, **kw})
    return Transformer(cfg, build_attention("reference", torch.device("cpu"))).double()


def _run(model, tokens, cu):
    mb = make_microbatch(np.asarray(tokens), np.asarray(cu, dtype=np.int32), torch.device("cpu"))
    return model(mb.tokens, mb.ctx)


def test_packed_documents_do_not_see_each_other():
    model = _model()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 64, n) for n in (17, 31, 11)]
    packed = _run(model, np.concatenate(docs), [0, 17, 48, 59])
    alone = torch.cat([_run(model, d, [0, len(d)]) for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


def test_causal_prefix_invariance_and_gqa_shapes():
    model = _model()
    tokens = np.random.default_rng(1).integers(0, 64, 40)
    full = _run(model, tokens, [0, 40])
    prefix = _run(model, tokens[:25], [0, 25])
    assert full.shape == (40, 64) and full.dtype == torch.float32
    torch.testing.assert_close(full[:25], prefix, rtol=1e-6, atol=1e-6)
    assert model.layers[0].attention.wk.weight.shape == (2 * 8, 32)


def test_tied_and_untied_embeddings():
    tied = _model(tie_embeddings=True)
    untied = _model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_params() == tied.num_params() + 64 * 32


def test_activation_checkpointing_same_gradients():
    """The policy is applied from outside, as the trainer does for model.activation_checkpointing:
    same gradients, and the blocks really recompute (attention runs twice per layer)."""
    from seqpar.memory.checkpoint import apply_activation_checkpointing

    tokens = np.random.default_rng(2).integers(0, 64, 30)
    grads, calls = [], []
    for ckpt in (False, True):
        model = _model(activation_checkpointing=ckpt)
        if model.cfg.activation_checkpointing:
            apply_activation_checkpointing(model.layers)
        attention, count = model.layers[0].attention.attention, [0]

        def counted(*args, _inner=attention):
            count[0] += 1
            return _inner(*args)

        for block in model.layers:
            block.attention.attention = counted
        _run(model, tokens, [0, 12, 30]).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        calls.append(count[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert calls == [2, 4]  # 2 layers: forward only, then forward + recompute


def test_rope_is_relative_and_fp32():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 16, dtype=torch.bfloat16), torch.randn(1, 1, 16, dtype=torch.bfloat16)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([pq]), 16, 10000.0)
        ck, sk = rope_tables(torch.tensor([pk]), 16, 10000.0)
        assert cq.dtype == torch.float32
        return (apply_rope(q.float(), cq, sq) * apply_rope(k.float(), ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    assert apply_rope(q, *rope_tables(torch.tensor([3]), 16, 1e4)).dtype == torch.bfloat16


def test_flops_count_causal_attention_per_document():
    cfg = ModelConfig(**CFG)
    assert attention_pairs([4]) == 10 and attention_pairs([4], causal=False) == 16
    assert attention_pairs([2, 2]) == 6
    one = train_flops(cfg, [1024])
    packed = train_flops(cfg, [512, 512])
    linear = 6 * matmul_params(cfg) * 1024
    attn_one = 12 * 2 * 4 * 8 * (1024 * 1025 // 2)
    assert one == linear + attn_one
    assert packed < one  # packed documents skip cross-document pairs
    assert matmul_params(cfg) == 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * cfg.ffn_dim) + 32 * 64
