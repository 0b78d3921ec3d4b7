"""The torch reference of the block-attention contract against the fp64 oracle.

Run: python -m pytest tests/kernels -q
"""

from __future__ import annotations

import math

import pytest
import torch

from seqpar.kernels import (
    block_attention,
    block_attn_bwd,
    block_attn_fwd,
    doc_ids_and_positions,
    merge,
    resolve_impl,
    varlen_attention,
)
from seqpar.kernels import reference
from seqpar.kernels.dispatch import get_impl
from seqpar.kernels.varlen import validate_cu_seqlens
from tests.support.oracle import assert_close_to_oracle, oracle_grads, oracle_varlen

SMALL_DOCS = [17, 31, 11]
LONG_DOCS = [1987, 523, 271, 1009]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _stream(seqlens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """doc ids and positions of a packed stream, built independently of kernels.varlen."""
    docs = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(seqlens)])
    pos = torch.cat([torch.arange(n) for n in seqlens])
    return docs, pos


def _qkv(tq: int, tk: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(tk, kv_heads, dim, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(tk, kv_heads, dim, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(tq, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def _check(actual: torch.Tensor, ref: torch.Tensor, rel: float, what: str = "") -> None:
    """|actual - ref| <= rel * max(1, max|ref|), with -inf required to match exactly."""
    assert actual.shape == ref.shape, (what, actual.shape, ref.shape)
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), ref.double(), rtol=0.0, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def _check_all(q, k, v, dout, q_doc, q_pos, k_doc, k_pos, causal, scale, rel) -> None:
    out, lse = block_attn_fwd(q, k, v, q_doc, q_pos, k_doc, k_pos, causal=causal, scale=scale)
    dq, dk, dv = block_attn_bwd(dout, q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos, causal=causal, scale=scale)
    ref = oracle_grads(q, k, v, dout, q_doc, q_pos, k_doc, k_pos, causal, scale)
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
        _check(a, r, rel, name)


# --------------------------------------------------------------------------- fwd/bwd vs oracle


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "seqlens,heads,kv_heads",
    [(SMALL_DOCS, 4, 4), (SMALL_DOCS, 4, 2), (SMALL_DOCS, 4, 1), (LONG_DOCS, 1, 1)],
    ids=["mha", "gqa", "mqa", "long"],
)
def test_fwd_bwd_match_oracle(seqlens, heads, kv_heads, causal, dtype):
    t, dim = sum(seqlens), 16
    q, k, v, dout = _qkv(t, t, heads, kv_heads, dim, dtype)
    docs, pos = _stream(seqlens)
    scale = 1 / math.sqrt(dim)
    inputs = [t.clone() for t in (q, k, v, dout)]
    out, lse = block_attn_fwd(q, k, v, docs, pos, docs, pos, causal=causal, scale=scale)
    assert out.dtype == lse.dtype == dtype
    dq, dk, dv = block_attn_bwd(dout, q, k, v, out, lse, docs, pos, docs, pos, causal=causal, scale=scale)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v, dout))), "inputs were modified"
    ref = oracle_grads(q, k, v, dout, seqlens, causal, scale, attn=oracle_varlen)
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
        _check(a, r, TOL[dtype], name)


def test_low_precision_inputs_compute_in_fp32():
    q, k, v, dout = _qkv(59, 59, 4, 2, 16, torch.bfloat16)
    docs, pos = _stream(SMALL_DOCS)
    out, lse = block_attn_fwd(q, k, v, docs, pos, docs, pos, causal=True, scale=0.25)
    dq, dk, dv = block_attn_bwd(dout, q, k, v, out, lse, docs, pos, docs, pos, causal=True, scale=0.25)
    assert {t.dtype for t in (out, lse, dq, dk, dv)} == {torch.float32}
    # Inputs are exact in bf16, so the only error is fp32 compute.
    ref = oracle_grads(q, k, v, dout, docs, pos, docs, pos, True, 0.25)
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
        _check(a, r, 1e-5, name)


@pytest.mark.parametrize("key_order", ["sorted", "pos_shuffled", "shuffled"])
def test_chunked_paths_match_oracle(monkeypatch, key_order):
    # A tiny budget forces many query chunks and per-chunk key ranges; the key
    # orders hit the (doc, pos)-sorted, doc-sorted and unsorted planner paths.
    monkeypatch.setattr(reference, "SCORE_BLOCK_BYTES", 2048)
    docs, pos = _stream(SMALL_DOCS)
    q, k, v, dout = _qkv(59, 59, 4, 2, 16, torch.float64)
    g = torch.Generator().manual_seed(1)
    perm = torch.arange(59)
    if key_order == "shuffled":
        perm = torch.randperm(59, generator=g)
    elif key_order == "pos_shuffled":
        perm = torch.argsort(docs * 1000 + torch.randperm(59, generator=g))  # docs stay sorted
    k, v, k_doc, k_pos = k[perm], v[perm], docs[perm], pos[perm]
    for causal in (True, False):
        _check_all(q, k, v, dout, docs, pos, k_doc, k_pos, causal, 0.25, 1e-10)


def _planned_cells(docs, pos, causal, budget_bytes=1 << 20, elem_bytes=8):
    chunks = reference._plan_chunks(docs, pos, docs, pos, causal, heads=1, elem_bytes=elem_bytes)
    assert chunks[0][0] == 0 and chunks[-1][1] == docs.numel()
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])), "query chunks must tile the queries"
    assert all((q1 - q0) * (k1 - k0) <= budget_bytes // elem_bytes for q0, q1, k0, k1 in chunks)
    return sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in chunks)


def test_planner_skips_invisible_keys(monkeypatch):
    monkeypatch.setattr(reference, "SCORE_BLOCK_BYTES", 1 << 20)
    docs, pos = _stream(LONG_DOCS)
    full = _planned_cells(docs, pos, causal=False)
    causal = _planned_cells(docs, pos, causal=True)
    same_doc = sum(n * n for n in LONG_DOCS)
    assert same_doc <= full < 1.1 * same_doc, (full, same_doc)  # vs T^2 = 3.4 x same_doc
    assert causal < 0.6 * same_doc, (causal, same_doc)  # the upper triangles are skipped


def test_planner_bounds_masked_cells_at_the_default_budget():
    """A zigzag-like shard of a packed stream (each document's keys contiguous) fits the 64 MB
    budget whole, but one chunk over all of it would be mostly masked: chunks stay near the cells
    their rows can see."""
    lengths = [300] * 16  # 4,800 tokens: one 4,800^2 block would fit the default budget
    docs, pos = _stream(lengths)
    for causal in (False, True):
        chunks = reference._plan_chunks(docs, pos, docs, pos, causal, heads=4, elem_bytes=4)
        cells = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in chunks)
        need = sum(n * n for n in lengths)
        assert cells <= reference.MAX_WASTE * need + len(chunks) * reference.SMALL_CHUNK_CELLS, (causal, cells, need)
        assert cells < 0.2 * sum(lengths) ** 2


# --------------------------------------------------------------------------- shards and merge


def _zigzag(seqlens: list[int], rank: int, world: int) -> torch.Tensor:
    """Token indices of one rank under per-document zigzag (chunks r and 2w-1-r of each doc)."""
    idx, start = [], 0
    for n in seqlens:
        bounds = [start + n * c // (2 * world) for c in range(2 * world + 1)]
        for c in (rank, 2 * world - 1 - rank):
            idx.append(torch.arange(bounds[c], bounds[c + 1]))
        start += n
    return torch.cat(idx)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_shards_of_a_stream(causal):
    docs, pos = _stream(SMALL_DOCS)
    q, k, v, dout = _qkv(59, 59, 4, 2, 16, torch.float64)
    qi, ki = _zigzag(SMALL_DOCS, 0, 2), _zigzag(SMALL_DOCS, 1, 2)
    for dtype, rel in TOL.items():
        qs, ks, vs, ds = q[qi].to(dtype), k[ki].to(dtype), v[ki].to(dtype), dout[qi].to(dtype)
        _check_all(qs, ks, vs, ds, docs[qi], pos[qi], docs[ki], pos[ki], causal, 0.25, rel)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_merge_of_two_key_blocks_equals_full_attention(causal):
    docs, pos = _stream(SMALL_DOCS)
    q, k, v, dout = _qkv(59, 59, 4, 2, 16, torch.float64, seed=3)
    qi = _zigzag(SMALL_DOCS, 0, 2)
    blocks = [_zigzag(SMALL_DOCS, r, 2) for r in range(2)]
    kw = dict(causal=causal, scale=0.25)
    q, dout, q_doc, q_pos = q[qi], dout[qi], docs[qi], pos[qi]

    parts = [block_attn_fwd(q, k[b], v[b], q_doc, q_pos, docs[b], pos[b], **kw) for b in blocks]
    out, lse = merge(*parts[0], *parts[1])
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = oracle_grads(q, k, v, dout, q_doc, q_pos, docs, pos, causal, 0.25)
    _check(out, ref_out, 1e-10, "out")
    _check(lse, ref_lse, 1e-10, "lse")

    # Backward per block from the final merged out/lse, then summed / scattered.
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for b in blocks:
        gq, gk, gv = block_attn_bwd(dout, q, k[b], v[b], out, lse, q_doc, q_pos, docs[b], pos[b], **kw)
        dq += gq
        dk[b] += gk
        dv[b] += gv
    for name, a, r in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        _check(a, r, 1e-10, name)

    # Working precision: merged fp32 error within 2x the single-block fp32 error.
    q32, k32, v32 = q.float(), k.float(), v.float()
    parts32 = [block_attn_fwd(q32, k32[b], v32[b], q_doc, q_pos, docs[b], pos[b], **kw) for b in blocks]
    out32, lse32 = merge(*parts32[0], *parts32[1])
    single_out, single_lse = block_attn_fwd(q32, k32, v32, q_doc, q_pos, docs, pos, **kw)
    assert out32.dtype == torch.float32
    assert_close_to_oracle(out32, ref_out, single_out, name="out")
    assert_close_to_oracle(lse32, ref_lse, single_lse, name="lse")


def test_merge_handles_empty_sides():
    inf = float("-inf")
    g = torch.Generator().manual_seed(0)
    out_a, out_b = torch.randn(3, 1, 2, generator=g), torch.randn(3, 1, 2, generator=g)
    out_a[0], out_b[1], out_a[2], out_b[2] = 0, 0, 0, 0  # empty rows carry out = 0 by contract
    lse_a = torch.tensor([[inf, 0.5, inf]])
    lse_b = torch.tensor([[1.5, inf, inf]])
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[0], out_b[0])
    torch.testing.assert_close(out[1], out_a[1])
    assert torch.equal(out[2], torch.zeros(1, 2))
    assert torch.equal(lse, torch.tensor([[1.5, 0.5, inf]]))


def test_merge_is_stable_for_large_lse():
    out_a, out_b = torch.ones(1, 1, 1), 3 * torch.ones(1, 1, 1)
    out, lse = merge(out_a, torch.tensor([[1000.0]]), out_b, torch.tensor([[1000.0]]))
    torch.testing.assert_close(out, 2 * torch.ones(1, 1, 1))
    torch.testing.assert_close(lse, torch.tensor([[1000.0 + math.log(2)]]))


# --------------------------------------------------------------------------- edge cases


def test_fully_masked_rows():
    # Doc 1 has no key in this block; doc 2's first query precedes every doc-2 key.
    q_doc, q_pos = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 5])
    k_doc, k_pos = torch.tensor([0, 0, 2, 2]), torch.tensor([0, 1, 3, 4])
    q, k, v, dout = _qkv(6, 4, 2, 1, 8, torch.float64)
    for causal, empty in ((True, [2, 3, 4]), (False, [2, 3])):
        out, lse = block_attn_fwd(q, k, v, q_doc, q_pos, k_doc, k_pos, causal=causal, scale=0.3)
        dq, dk, dv = block_attn_bwd(dout, q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos, causal=causal, scale=0.3)
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))
        seen = [i for i in range(6) if i not in empty]
        assert torch.isneginf(lse[:, empty]).all() and torch.isfinite(lse[:, seen]).all()
        assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))
        assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
        _check_all(q, k, v, dout, q_doc, q_pos, k_doc, k_pos, causal, 0.3, 1e-10)


def test_all_rows_masked_gives_zero_grads():
    q, k, v, dout = _qkv(3, 2, 2, 2, 4, torch.float32)
    q_doc, k_doc = torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.long)  # no shared document
    pos3, pos2 = torch.arange(3), torch.arange(2)
    out, lse = block_attn_fwd(q, k, v, q_doc, pos3, k_doc, pos2, causal=False, scale=1.0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    grads = block_attn_bwd(dout, q, k, v, out, lse, q_doc, pos3, k_doc, pos2, causal=False, scale=1.0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("tq,tk", [(0, 5), (4, 0), (0, 0)])
def test_empty_inputs(tq, tk):
    q, k, v, dout = _qkv(tq, tk, 4, 2, 8, torch.float32)
    q_doc, q_pos = torch.zeros(tq, dtype=torch.int32), torch.arange(tq, dtype=torch.int32)
    k_doc, k_pos = torch.zeros(tk, dtype=torch.int32), torch.arange(tk, dtype=torch.int32)
    out, lse = block_attn_fwd(q, k, v, q_doc, q_pos, k_doc, k_pos, causal=True, scale=0.5)
    assert out.shape == (tq, 4, 8) and lse.shape == (4, tq)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, dk, dv = block_attn_bwd(dout, q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos, causal=True, scale=0.5)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    assert not any(g.abs().sum() for g in (dq, dk, dv))


# --------------------------------------------------------------------------- autograd wrappers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_block_attention_autograd_matches_oracle(dtype):
    docs, pos = _stream(SMALL_DOCS)
    qi, ki = _zigzag(SMALL_DOCS, 1, 2), torch.arange(59)
    q, k, v, dout = _qkv(59, 59, 4, 1, 16, dtype, seed=5)
    q, dout = q[qi], dout[qi]
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = block_attention(*leaves, docs[qi], pos[qi], docs[ki], pos[ki], return_lse=True)
    out.backward(dout)
    ref = oracle_grads(q, k, v, dout, docs[qi], pos[qi], docs[ki], pos[ki], True, 1 / 4)
    actual = (out, lse, *(t.grad for t in leaves))
    assert out.dtype == dtype and lse.dtype == dtype and not lse.requires_grad
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), actual, ref):
        _check(a, r, TOL[dtype], name)


def test_block_attention_gradcheck():
    docs, pos = _stream([3, 4])
    q, k, v, _ = _qkv(7, 7, 2, 1, 4, torch.float64, seed=7)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    fn = lambda q, k, v: block_attention(q, k, v, docs, pos, docs, pos, causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_block_attention_keeps_input_dtype():
    docs, pos = _stream(SMALL_DOCS)
    q, k, v, dout = _qkv(59, 59, 4, 2, 16, torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = block_attention(*leaves, docs, pos, docs, pos, impl="auto", return_lse=True)
    out.backward(dout)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (4, 59)
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.shape == t.shape for t in leaves)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_attention_matches_oracle(causal):
    q, k, v, dout = _qkv(59, 59, 4, 2, 16, torch.float64, seed=9)
    cu = torch.tensor([0, 17, 48, 59], dtype=torch.int32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = varlen_attention(*leaves, cu, causal=causal, scale=0.2, return_lse=True)
    out.backward(dout)
    ref = oracle_grads(q, k, v, dout, SMALL_DOCS, causal, 0.2, attn=oracle_varlen)
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *(t.grad for t in leaves)), ref):
        _check(a, r, 1e-10, name)


def test_autograd_with_no_keys():
    q, k, v, dout = _qkv(3, 0, 2, 2, 4, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    z3, z0 = torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    out = block_attention(*leaves, z3, z3, z0, z0)
    out.backward(dout)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(leaves[0].grad, torch.zeros_like(q))


# --------------------------------------------------------------------------- varlen helpers


def test_doc_ids_and_positions():
    doc, pos = doc_ids_and_positions(torch.tensor([0, 3, 3, 5], dtype=torch.int32))
    assert doc.dtype == pos.dtype == torch.int32
    assert doc.tolist() == [0, 0, 0, 2, 2]
    assert pos.tolist() == [0, 1, 2, 0, 1]
    doc, pos = doc_ids_and_positions(torch.tensor([0], dtype=torch.int32))
    assert doc.shape == pos.shape == (0,)
    cu = torch.tensor([0, *torch.tensor(LONG_DOCS).cumsum(0).tolist()], dtype=torch.int32)
    doc, pos = doc_ids_and_positions(cu)
    ref_doc, ref_pos = _stream(LONG_DOCS)
    assert torch.equal(doc.long(), ref_doc) and torch.equal(pos.long(), ref_pos)


@pytest.mark.parametrize(
    "cu,total,match",
    [
        (torch.tensor([[0, 3]], dtype=torch.int32), None, "1-D"),
        (torch.tensor([], dtype=torch.int32), None, "1-D"),
        (torch.tensor([0.0, 3.0]), None, "integer"),
        (torch.tensor([1, 3], dtype=torch.int32), None, "start at 0"),
        (torch.tensor([0, 5, 3], dtype=torch.int32), None, "non-decreasing"),
        (torch.tensor([0, 3, 5], dtype=torch.int32), 6, r"end at the number of tokens \(6\), got 5"),
    ],
)
def test_validate_cu_seqlens_errors(cu, total, match):
    with pytest.raises(ValueError, match=match):
        validate_cu_seqlens(cu, total)


def test_varlen_attention_rejects_wrong_total():
    q, k, v, _ = _qkv(5, 5, 1, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="end at the number of tokens"):
        varlen_attention(q, k, v, torch.tensor([0, 2, 4], dtype=torch.int32))


# --------------------------------------------------------------------------- validation and dispatch


def test_head_count_error():
    q, k, v, _ = _qkv(4, 4, 6, 4, 8, torch.float32)
    d = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"block_attn_fwd: heads \(6\) must be a multiple of kv_heads \(4\)"):
        block_attn_fwd(q, k, v, d, d, d, d, causal=True, scale=1.0)
    with pytest.raises(ValueError, match=r"heads \(6\) must be a multiple of kv_heads \(4\)"):
        block_attention(q, k, v, d, d, d, d)


def test_shape_errors():
    q, k, v, dout = _qkv(4, 4, 2, 1, 8, torch.float32)
    d = torch.zeros(4, dtype=torch.long)
    kw = dict(causal=True, scale=1.0)
    with pytest.raises(ValueError, match="k and v must both be"):
        block_attn_fwd(q, k, v[:, :, :4], d, d, d, d, **kw)
    with pytest.raises(ValueError, match=r"head_dim of q \(8\) and k/v \(4\)"):
        block_attn_fwd(q, k[..., :4], v[..., :4], d, d, d, d, **kw)
    with pytest.raises(ValueError, match="k_pos must be a 1-D integer tensor of length 4"):
        block_attn_fwd(q, k, v, d, d, d, d[:3], **kw)
    with pytest.raises(ValueError, match="q_doc must be a 1-D integer tensor"):
        block_attn_fwd(q, k, v, d.float(), d, d, d, **kw)
    out, lse = block_attn_fwd(q, k, v, d, d, d, d, **kw)
    with pytest.raises(ValueError, match=r"lse must be \[heads, tokens\]"):
        block_attn_bwd(dout, q, k, v, out, lse.T, d, d, d, d, **kw)
    with pytest.raises(ValueError, match="merge: lse_a"):
        merge(out, lse, out, lse[:, :2])


def test_dispatch(monkeypatch):
    from seqpar.kernels import triton_attn

    # auto on CPU: torch's fused CPU kernel for whole-document blocks and ring tiles, the reference elsewhere.
    from seqpar.kernels import cpu_tiles

    assert resolve_impl("auto", torch.device("cpu")) == "sdpa_cpu"
    assert get_impl("sdpa_cpu") == (cpu_tiles.block_attn_fwd, cpu_tiles.block_attn_bwd)
    assert get_impl("reference") == (block_attn_fwd, block_attn_bwd)
    with pytest.raises(ValueError, match="sdpa_cpu runs on CPU"):
        resolve_impl("sdpa_cpu", "cuda")
    assert resolve_impl("auto", "cuda") == "triton"
    assert resolve_impl("reference", "cuda") == "reference"
    assert get_impl("reference") == (block_attn_fwd, block_attn_bwd)
    assert get_impl("triton") == (triton_attn.block_attn_fwd, triton_attn.block_attn_bwd)
    assert resolve_impl("triton", "cuda") == "triton"
    monkeypatch.setattr(triton_attn, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="triton needs a CUDA device .*TRITON_INTERPRET=1"):
        resolve_impl("triton", torch.device("cpu"))
    monkeypatch.setattr(triton_attn, "interpreting", lambda: True)
    assert resolve_impl("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="auto, triton, reference"):
        resolve_impl("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="auto, triton, reference"):
        block_attention(*_qkv(2, 2, 1, 1, 4, torch.float32)[:3], *(torch.zeros(2, dtype=torch.long),) * 4, impl="sdpa")
    with pytest.raises(ValueError, match="resolve_impl"):
        get_impl("auto")
