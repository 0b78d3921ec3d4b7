"""Seeded init, single process: values are a function of (seed, name, shape) only.

Sharded (FSDP2 DTensor) and replicated builds are compared with this path in
tests/train/test_build.py."""

import math

import pytest
import torch
from torch import nn

from seqpar.config import ModelConfig
from seqpar.model import init as init_mod
from seqpar.model.init import InitRule, block_seed, canonical_name, init_parameters, rows_per_block
from seqpar.model.llama import Transformer

CFG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64)


def _attn(q, k, v, ctx):
    return q


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **kw}), _attn)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class _Odd(nn.Module):
    """Shapes the Transformer lacks: 3-D, 0-d, one row, a row longer than a block."""

    def __init__(self) -> None:
        super().__init__()
        self.cube = nn.Parameter(torch.empty(5, 3, 4))
        self.scalar = nn.Parameter(torch.empty(()))
        self.row = nn.Parameter(torch.empty(1, 7))
        self.wide = nn.Parameter(torch.empty(3, 40))


def _normal(name, shape):
    return InitRule.normal(1.0)


def test_rule_validation():
    with pytest.raises(ValueError, match="must be one of normal, ones, zeros"):
        InitRule("uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive finite std"):
        InitRule.normal(0.0)
    assert InitRule.ones() == InitRule("ones")


def test_values_are_the_documented_row_blocks():
    """The definition itself: block b of a parameter is fp32 normal(0, std) drawn from a CPU
    generator seeded by block_seed(seed, name, b), rows_per_block rows at a time."""
    m = _Odd()
    init_parameters(m, 5, _normal, block_elements=16)
    for name, p in m.named_parameters():
        shape = tuple(p.shape)
        rows = shape[0] if shape else 1
        rpb = rows_per_block(shape, 16)
        blocks = []
        for b in range(-(-rows // rpb)):
            g = torch.Generator().manual_seed(block_seed(5, name, b))
            blocks.append(torch.empty((min(rpb, rows - b * rpb), *shape[1:])).normal_(0.0, 1.0, generator=g))
        expected = torch.cat(blocks).reshape(shape)
        assert torch.equal(p.detach(), expected), name
    assert rows_per_block((5, 3, 4), 16) == 1 and rows_per_block((3, 40), 16) == 1  # a row longer than a block
    assert rows_per_block((100,), 16) == 16 and rows_per_block((), 16) == 16


def test_block_seed_is_pinned():
    """Python's hash() of a str is salted per process; block seeds are a fixed function (blake2b),
    pinned here because changing them changes every model's initial weights."""
    assert block_seed(1234, "layers.0.attention.wq.weight", 3) == 8237995515772456184
    assert block_seed(0, "tok_embeddings.weight", 0) == 1881942340070940426
    assert 0 <= block_seed(2**64 - 1, "x", 10**9) < 2**63


def test_seed_from_torch_manual_seed_and_explicit_seed_agree():
    a, b = _params(_model(seed=3)), _params(_model(seed=3))
    assert all(torch.equal(a[n], b[n]) for n in a)  # same seed, two builds: same values
    m = _model(seed=99)
    m.reset_parameters(seed=3)
    assert all(torch.equal(a[n], p) for n, p in m.named_parameters())
    with torch.device("meta"):
        meta = Transformer(ModelConfig(**CFG), _attn)
    meta.to_empty(device="cpu")  # unties tok_embeddings / output (build_model ties them again)
    meta.output.weight = meta.tok_embeddings.weight
    init_parameters(meta, 3, meta.init_rule)
    assert all(torch.equal(a[n], p) for n, p in meta.named_parameters())


def test_different_seeds_and_names_give_different_values():
    a, b = _params(_model(seed=0)), _params(_model(seed=1))
    for n in a:
        if a[n].ndim > 1:
            assert not torch.equal(a[n], b[n]), n
    # Same shape, same rule, different names: different values.
    assert not torch.equal(a["layers.0.attention.wq.weight"], a["layers.1.attention.wq.weight"])
    assert not torch.equal(a["layers.0.feed_forward.w1.weight"], a["layers.0.feed_forward.w3.weight"])


def test_distributions_follow_the_rule():
    m = _model(n_layers=8, dim=256, n_heads=8, n_kv_heads=8, vocab_size=512)
    std, out_std = 0.02, 0.02 / math.sqrt(16)
    assert m.init_rule("layers.3.attention.wo.weight", (256, 256)) == InitRule.normal(out_std)
    assert m.init_rule("layers.3.feed_forward.w2.weight", (256, 704)) == InitRule.normal(out_std)
    assert m.init_rule("layers.3.feed_forward.w1.weight", (704, 256)) == InitRule.normal(std)
    assert m.init_rule("norm.weight", (256,)) == InitRule.ones()
    for name, p in m.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            target = out_std if name.endswith(("wo.weight", "w2.weight")) else std
            assert p.mean().abs() < 0.1 * target and p.std().item() == pytest.approx(target, rel=0.03), name


def test_tied_parameter_initialised_once_and_names_decide():
    tied, untied = _model(tie_embeddings=True), _model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    t, u = _params(tied), _params(untied)
    assert "output.weight" not in t  # named_parameters() yields a tied parameter once
    for n in t:  # adding the untied head changes no other parameter
        assert torch.equal(t[n], u[n]), n
    assert not torch.equal(u["output.weight"], u["tok_embeddings.weight"])


def test_dtype_and_block_count_do_not_change_values():
    """fp64 parameters hold the fp32 draw exactly; the values do not depend on how many blocks a
    rank generates (a parameter filled whole equals one filled in pieces elsewhere)."""
    m32, m64 = _Odd(), _Odd().double()
    init_parameters(m32, 1, _normal, block_elements=16)
    init_parameters(m64, 1, _normal, block_elements=16)
    for (n, a), (_, b) in zip(m32.named_parameters(), m64.named_parameters()):
        assert b.dtype == torch.float64 and torch.equal(a.double(), b), n
    # ones / zeros rules and InitStats
    init_mod.reset_init_stats()
    m = _Odd()
    init_parameters(m, 1, lambda n, s: InitRule.zeros() if n == "cube" else InitRule.normal(0.5), block_elements=16)
    assert torch.equal(m.cube, torch.zeros(5, 3, 4))
    stats = init_mod.init_stats()
    assert stats.generated == 1 + 7 + 120 and "cube" not in stats.per_param  # ones/zeros draw nothing
    assert stats.largest_block == 40 and stats.per_param["wide"] == (120, 120, 40)


def test_wrapper_prefixes_do_not_change_values():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = _model()
    wrapped = _model()
    for i, block in enumerate(list(wrapped.layers)):
        wrapped.layers[i] = checkpoint_wrapper(block)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    wrapped.reset_parameters(seed=0)
    for (n, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.equal(a, b), n
    assert canonical_name("layers.0._checkpoint_wrapped_module.ffn_norm.weight") == "layers.0.ffn_norm.weight"


def test_meta_construction_skips_init_and_meta_init_is_an_error():
    with torch.device("meta"):
        meta = Transformer(ModelConfig(**CFG), _attn)
    assert all(p.is_meta for p in meta.parameters())
    with pytest.raises(ValueError, match=r"tok_embeddings.weight is on the meta device: call model.to_empty"):
        init_parameters(meta, 0, meta.init_rule)
