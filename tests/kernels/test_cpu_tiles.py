"""Ring steps on CPU through fused tiles (kernels/cpu_tiles.py) against the reference kernel, block
by block: every (query rank, key rank) block of zigzag and contiguous layouts of packed awkward
documents, causal and full, MHA / GQA / MQA, fp64 to rounding, fp32 tight, bf16 loose; blocks the
tiles cannot cover fall back to the reference and say so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpar.attention.layout import build_layout
from seqpar.attention.meta import host_docs_and_positions
from seqpar.kernels import cpu_tiles, reference

CASES = [((7, 1, 23, 2, 31), 2, "zigzag"), ((300, 400, 11), 4, "zigzag"), ((5, 90, 33, 128), 3, "zigzag"),
         ((1000,), 8, "zigzag"), ((7, 1, 23, 2, 31), 2, "contiguous"), ((129, 3, 64), 4, "contiguous")]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _blocks(lens, world, kind, heads, kv_heads, dtype, dim=16):
    cu = np.concatenate([[0], np.cumsum(lens)])
    doc, pos = host_docs_and_positions(cu)
    lay = build_layout(cu, kind, ring=world)
    g = torch.Generator().manual_seed(len(lens) * world)
    t = int(cu[-1])
    q, k, v = (torch.randn(t, h, dim, generator=g, dtype=torch.float64).to(dtype) for h in (heads, kv_heads, kv_heads))
    for r in range(world):
        for s in range(world):
            qi, ki = lay.indices[r], lay.indices[s]
            yield (q[qi], k[ki], v[ki], torch.as_tensor(doc[qi]), torch.as_tensor(pos[qi]), torch.as_tensor(doc[ki]),
                   torch.as_tensor(pos[ki]))


@pytest.mark.parametrize("lens,world,kind", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tiles_match_the_reference_block_by_block(lens, world, kind, causal, heads, kv_heads, dtype):
    tiled = 0
    for args in _blocks(lens, world, kind, heads, kv_heads, dtype):
        plan = cpu_tiles.tiles(cpu_tiles.runs(args[3], args[4]), cpu_tiles.runs(args[5], args[6]), causal)
        assert plan is not None  # zigzag and contiguous ring blocks are always full / diagonal / none tiles
        tiled += bool(plan)
        o_ref, l_ref = reference.block_attn_fwd(*args, causal=causal, scale=0.3)
        o, lse = cpu_tiles.block_attn_fwd(*args, causal=causal, scale=0.3)
        assert o.dtype == o_ref.dtype and lse.dtype == l_ref.dtype
        assert torch.equal(torch.isinf(lse), torch.isinf(l_ref))  # rows with no visible key: -inf, out 0
        finite = ~torch.isinf(l_ref)
        tol = TOL[dtype]
        assert (o - o_ref).abs().max() <= tol and torch.all((lse[finite] - l_ref[finite]).abs() <= tol)
        dout = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1), dtype=o_ref.dtype)
        # the backward takes the final out and lse (the reference's, as a ring would pass them)
        want = reference.block_attn_bwd(dout, *args[:3], o_ref, l_ref, *args[3:], causal=causal, scale=0.3)
        got = cpu_tiles.block_attn_bwd(dout, *args[:3], o_ref, l_ref, *args[3:], causal=causal, scale=0.3)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert (a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))
    assert tiled >= world  # the fast path ran (at least every diagonal block)


def test_partial_tiles_and_tiny_runs_fall_back_to_the_reference(monkeypatch):
    # queries at positions 0..9 against keys 5..14 of one document: neither full, diagonal nor hidden
    q_runs, k_runs = [(0, 0, 10, 0)], [(0, 0, 10, 5)]
    assert cpu_tiles.tiles(q_runs, k_runs, causal=True) is None
    assert cpu_tiles.tiles(q_runs, k_runs, causal=False) == [(0, 10, 0, 10, False)]
    called = []
    monkeypatch.setattr(reference, "block_attn_fwd", lambda *a, **kw: called.append(1) or ("ref", None))
    pos = torch.arange(10)
    assert cpu_tiles.block_attn_fwd(torch.zeros(10, 2, 8), torch.zeros(10, 2, 8), torch.zeros(10, 2, 8),
                                    torch.zeros(10, dtype=torch.long), pos, torch.zeros(10, dtype=torch.long), pos + 5,
                                    causal=True, scale=1.0)[0] == "ref"
    monkeypatch.setattr(cpu_tiles, "MAX_TILES", 2)
    many = [(d, d, 1, 0) for d in range(4)]  # four one-token documents: four diagonal tiles
    assert cpu_tiles.tiles(many, many, causal=True) is None and called == [1]
    assert cpu_tiles.runs(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 3, 0, 1])) == [(0, 0, 2, 0), (0, 2, 1, 3), (1, 3, 2, 0)]
