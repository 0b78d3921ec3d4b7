"""Triton block attention equals the fp64 oracle as closely as the torch reference does.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU) with 16 x 16 tiles, so a few dozen
tokens already make tiles of every class. Rule (MagiAttention): the Triton
error against the fp64 truth is at most 2x the reference's error in the same
input dtype plus 1e-5 (fp32; bf16, which the interpreter path upcasts right
after loading) or 2e-3 (fp16: p is rounded to fp16 before the P.V and dS^T.Q
products, as in FlashAttention).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from seqpar.attention.layout import build_layout
from seqpar.kernels import block_attention, reference, varlen_attention
from seqpar.kernels import ranges as rg
from seqpar.kernels import triton_attn as ta
from tests.support.oracle import _max_err, oracle_attention, oracle_grads

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or ta.interpreting()),
    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 at import (tests/conftest.py sets it on CPU)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Block:
    """One kernel call: a packed stream of documents, the query rows and key rows taken from it."""

    lens: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    causal: bool = True
    dtype: str = "float32"
    rows: str = "all"  # all | zigzag r<i>/k<j> (ring step of a 2-rank zigzag layout) | reversed_keys | missing_doc

    def stream(self):
        doc = torch.cat([torch.full((n,), i) for i, n in enumerate(self.lens)])
        pos = torch.cat([torch.arange(n) for n in self.lens])
        t = doc.numel()
        if self.rows == "all":
            qi = ki = torch.arange(t)
        elif self.rows.startswith("zigzag"):
            layout = build_layout(torch.tensor([0, *torch.tensor(self.lens).cumsum(0).tolist()]).numpy(), "zigzag", ulysses=1, ring=2)
            r, j = int(self.rows[8]), int(self.rows[11])
            qi, ki = (torch.as_tensor(layout.indices[x]) for x in (r, j))
        elif self.rows == "reversed_keys":  # keys not sorted by document: no loop bounds, EMPTY tiles visited
            qi = torch.arange(t)
            ki = torch.cat([torch.nonzero(doc == d).flatten() for d in reversed(range(len(self.lens)))])
        else:  # missing_doc: queries of document 0 see no key at all
            qi, ki = torch.arange(t), torch.nonzero(doc != 0).flatten()
        return qi, ki, doc, pos


BLOCKS = {
    "packed causal GQA": Block((40, 57)),
    "packed full GQA": Block((40, 57), causal=False),
    "packed causal MHA": Block((23, 9, 50), kv_heads=4),
    "MQA head_dim 20": Block((23, 50), kv_heads=1, head_dim=20),
    "one doc head_dim 64": Block((70,), heads=2, kv_heads=1, head_dim=64),
    "head_dim 128 full": Block((33,), heads=2, kv_heads=2, head_dim=128, causal=False),
    "zigzag ring step q1/k0": Block((48, 40), rows="zigzag r1/k0"),
    "zigzag ring step q0/k1": Block((48, 40), rows="zigzag r0/k1"),
    "keys unsorted": Block((20, 40, 30), rows="reversed_keys"),
    "keys unsorted full": Block((20, 40, 30), rows="reversed_keys", causal=False),
    "rows with no key": Block((24, 40), rows="missing_doc"),
    "fp16": Block((40, 57), dtype="float16"),
    "bf16": Block((40, 57), kv_heads=1, dtype="bfloat16"),
}


def _tol(dtype: str) -> float:
    if dtype == "float16" or (dtype == "bfloat16" and not ta.interpreting()):
        return 2e-3 if dtype == "float16" else 2e-2
    return 1e-5


def _inputs(b: Block, seed: int = 0):
    qi, ki, doc, pos = b.stream()
    g = torch.Generator().manual_seed(seed)
    t = doc.numel()
    q = torch.randn(t, b.heads, b.head_dim, generator=g)[qi]
    k = torch.randn(t, b.kv_heads, b.head_dim, generator=g)[ki]
    v = torch.randn(t, b.kv_heads, b.head_dim, generator=g)[ki]
    dout = torch.randn(t, b.heads, b.head_dim, generator=g)[qi]
    dtype = getattr(torch, b.dtype)
    # Round to the working dtype first, so truth and both kernels see the same numbers.
    q, k, v, dout = (x.to(dtype).to(DEVICE) for x in (q, k, v, dout))
    meta = tuple(x.to(DEVICE) for x in (doc[qi], pos[qi], doc[ki], pos[ki]))
    return q, k, v, dout, meta


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_oracle(name):
    b = BLOCKS[name]
    q, k, v, dout, meta = _inputs(b)
    scale = b.head_dim**-0.5
    kw = dict(causal=b.causal, scale=scale)
    truth = oracle_grads(q, k, v, dout, *meta, b.causal, scale, attn=oracle_attention)
    out_r, lse_r = reference.block_attn_fwd(q, k, v, *meta, **kw)
    ref = (out_r, lse_r, *reference.block_attn_bwd(dout, q, k, v, out_r, lse_r, *meta, **kw))
    out, lse = ta.block_attn_fwd(q, k, v, *meta, **kw)
    tri = (out, lse, *ta.block_attn_bwd(dout, q, k, v, out, lse, *meta, **kw))
    for what, x, r, t in zip(("out", "lse", "dq", "dk", "dv"), tri, ref, truth):
        assert x.dtype == torch.float32 and x.shape == t.shape, (what, x.dtype, x.shape)
        assert torch.isfinite(x).all() or what == "lse", f"{name}: {what} has NaN/inf"
        err, base = _max_err(x, t), _max_err(r, t)
        assert err <= 2 * base + _tol(b.dtype), f"{name}: {what} error {err:.2e} > 2 x reference {base:.2e} + tol"
    if b.rows == "missing_doc":  # queries of document 0: out 0, lse -inf, no gradient
        empty = meta[0] == 0
        assert (lse[:, empty] == float("-inf")).all() and (out[empty] == 0).all() and (tri[2][empty] == 0).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tile recording fixes the interpreter's tile size")
def test_kernel_visits_every_tile_class_as_predicted():
    """The forward kernel's own record of each visited tile equals ranges.tile_classes, and all classes occur."""
    seen = set()
    for name, b in BLOCKS.items():
        q, k, v, _, meta = _inputs(b)
        _, _, tiles = ta.forward_with_tiles(q, k, v, *meta, causal=b.causal, scale=0.25, record=True)
        assert torch.equal(tiles, rg.tile_classes(*meta, b.causal, *ta.INTERPRET_BLOCKS)), name
        seen |= set(tiles.flatten().tolist())
        if name == "keys unsorted":  # no loop bounds: the kernel itself must skip the other documents
            assert (tiles == rg.EMPTY).sum() >= 10
        if name == "one doc head_dim 64":
            assert (tiles == rg.FULL).sum() >= 6 and (tiles == rg.PARTIAL).sum() >= 5
    assert {rg.EMPTY, rg.FULL, rg.PARTIAL} <= seen


def test_tile_classes_by_hand():
    """Two documents of 16 tokens, 16 x 16 tiles: the pure classifier, independently of any kernel."""
    doc = torch.tensor([0] * 16 + [1] * 16)
    pos = torch.cat([torch.arange(16), torch.arange(16)])
    assert rg.tile_classes(doc, pos, doc, pos, True, 16, 16).tolist() == [[rg.PARTIAL, -1], [-1, rg.PARTIAL]]
    # Full attention, keys not sorted by document: every tile is visited, the off-diagonal ones are empty.
    rev = torch.cat([doc[16:], doc[:16]])
    assert rg.tile_classes(doc, pos, rev, pos, False, 16, 16).tolist() == [[0, 1], [1, 0]]
    # Queries 16..31 of one document against keys 0..15: FULL (all keys before all queries).
    one = torch.zeros(32, dtype=torch.long)
    pos32 = torch.arange(32)
    assert rg.tile_classes(one, pos32, one, pos32, True, 16, 16).tolist() == [[2, -1], [1, 2]]


def test_empty_sides():
    q = torch.randn(0, 2, 16, device=DEVICE)
    k = torch.randn(5, 1, 16, device=DEVICE)
    none, some = torch.zeros(0, dtype=torch.long, device=DEVICE), torch.zeros(5, dtype=torch.long, device=DEVICE)
    out, lse = ta.block_attn_fwd(q, k, k, none, none, some, some, causal=True, scale=1.0)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    q = torch.randn(5, 2, 16, device=DEVICE)
    out, lse = ta.block_attn_fwd(q, k[:0], k[:0], some, some, none, none, causal=True, scale=1.0)
    assert (out == 0).all() and (lse == float("-inf")).all()
    dq, dk, dv = ta.block_attn_bwd(q, q, k[:0], k[:0], out, lse, some, some, none, none, causal=True, scale=1.0)
    assert (dq == 0).all() and dk.shape == (0, 1, 16)


def test_bad_inputs_say_what_to_change():
    q = torch.randn(4, 2, 16, device=DEVICE, dtype=torch.float64)
    d = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32.*kernels.attention=reference"):
        ta.block_attn_fwd(q, q, q, d, d, d, d, causal=True, scale=1.0)
    with pytest.raises(ValueError, match=r"heads \(2\) must be a multiple of kv_heads \(3\)"):
        ta.block_attn_fwd(q.float(), q.float().repeat(1, 2, 1)[:, :3], q.float().repeat(1, 2, 1)[:, :3], d, d, d, d,
                          causal=True, scale=1.0)


def test_autograd_wrappers_with_triton():
    """block_attention / varlen_attention(impl='triton'): gradients in the inputs' dtype, equal to the reference."""
    lens = (30, 21, 13)
    cu = torch.tensor([0, 30, 51, 64], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(64, h, 16, generator=g).to(DEVICE) for h in (4, 2, 2)]
    grads = {}
    for impl in ("reference", "triton"):
        leaves = [x.clone().requires_grad_(True) for x in base]
        out, lse = varlen_attention(*leaves, cu, causal=True, impl=impl, return_lse=True)
        out.backward(torch.ones_like(out))
        grads[impl] = (out.detach(), lse, *(x.grad for x in leaves))
    for a, b in zip(grads["triton"], grads["reference"]):
        assert a.dtype == b.dtype and (a - b).abs().max() <= 1e-5
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lens)).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lens]).to(DEVICE)
    out = block_attention(*base, doc, pos, doc, pos, causal=True, impl="triton")
    assert (out - grads["reference"][0]).abs().max() <= 1e-5
