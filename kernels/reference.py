"""Torch reference of the block-attention contract.

This is the oracle every faster kernel and every distributed path is checked
against, so correctness comes first; it still uses batched matmuls and bounded
memory so it can run the tiny training configs on CPU.

Contract (see ARCHITECTURE.md, kernels/):

    block_attn_fwd(q, k, v, q_doc, q_pos, k_doc, k_pos, *, causal, scale) -> (out, lse)
    block_attn_bwd(dout, q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos, *, causal, scale)
        -> (dq, dk, dv)
    merge(out_a, lse_a, out_b, lse_b) -> (out, lse)

A query attends to a key iff they share a document and (not causal or
k_pos <= q_pos). Shapes: q [Tq, H, D], k/v [Tk, Hkv, D] with H % Hkv == 0,
docs/positions 1-D integer tensors, out [Tq, H, D], lse [H, Tq]. Results are in
the compute dtype promote(input dtype, float32): fp32 for bf16/fp16/fp32
inputs, fp64 for fp64 inputs.
"""

from __future__ import annotations

import torch

from seqpar.kernels.ranges import key_ranges

# Upper bound for one [H, q_chunk, k_span] score block. Module-level so tests
# can shrink it to exercise the chunking paths.
SCORE_BLOCK_BYTES = 64 << 20
# A query chunk may compute at most this many times the (query, key) cells its rows can see (plus
# SMALL_CHUNK_CELLS of slack, so streams of many tiny documents still run in few large bmm calls):
# a zigzag shard of a packed stream fits the byte budget whole, but most of its block is masked.
MAX_WASTE = 2.0
SMALL_CHUNK_CELLS = 1 << 16

_NEG_INF = float("-inf")

Chunk = tuple[int, int, int, int]  # (q_start, q_end, k_start, k_end)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """promote(input dtypes, float32): fp32 for low precision, fp64 stays fp64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def validate_args(fn: str, q, k, v, q_doc, q_pos, k_doc, k_pos) -> tuple[int, int]:
    """Check the contract's shapes; returns (kv_heads, group size)."""
    if q.dim() != 3:
        raise ValueError(f"{fn}: q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"{fn}: k and v must both be [tokens, kv_heads, head_dim], "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{fn}: {name} must be a floating tensor, got {t.dtype}")
    tq, heads, dim = q.shape
    tk, kv_heads, kdim = k.shape
    if kdim != dim:
        raise ValueError(f"{fn}: head_dim of q ({dim}) and k/v ({kdim}) must match")
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"{fn}: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    for name, t, n in (("q_doc", q_doc, tq), ("q_pos", q_pos, tq), ("k_doc", k_doc, tk), ("k_pos", k_pos, tk)):
        if t.dim() != 1 or t.shape[0] != n or not _is_int(t):
            raise ValueError(
                f"{fn}: {name} must be a 1-D integer tensor of length {n}, "
                f"got shape {tuple(t.shape)} dtype {t.dtype}"
            )
    return kv_heads, heads // kv_heads


def _plan_chunks(q_doc, q_pos, k_doc, k_pos, causal: bool, heads: int, elem_bytes: int) -> list[Chunk]:
    """Split queries into chunks whose [heads, n, k_span] score block fits the budget.

    With sorted keys each chunk only looks at the key range its queries can see
    (see ranges.key_ranges), so a packed stream of many documents costs about
    sum(len_doc^2) instead of T^2. Returns (q_start, q_end, k_start, k_end).
    """
    tq, tk = q_doc.shape[0], k_doc.shape[0]
    if tq == 0:
        return []
    if tk == 0:
        return [(0, tq, 0, 0)]
    budget = max(1, SCORE_BLOCK_BYTES // (heads * elem_bytes))  # n * k_span cells
    # On the host once, so the loop does not synchronise with an accelerator per chunk.
    lo, hi = (x.cpu() for x in key_ranges(q_doc, q_pos, k_doc, k_pos, causal))
    span = torch.zeros(tq + 1, dtype=torch.int64)
    torch.cumsum((hi - lo).clamp_(min=0).to(torch.int64), 0, out=span[1:])  # cells each row needs, summed
    chunks: list[Chunk] = []
    i = 0
    while i < tq:
        n = min(tq - i, max(1, budget // max(1, int(hi[i] - lo[i]))))
        while True:
            k0, k1 = int(lo[i : i + n].min()), int(hi[i : i + n].max())
            cells = n * (k1 - k0)
            need = int(span[i + n] - span[i])
            if n == 1 or (cells <= budget and cells <= MAX_WASTE * need + SMALL_CHUNK_CELLS):
                break
            n = max(1, min(n // 2, budget // max(1, k1 - k0)))
        chunks.append((i, i + n, k0, max(k0, k1)))
        i += n
    return chunks


def _to_heads(x: torch.Tensor, kv_heads: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, H, D] -> [Hkv, G * n, D] so one bmm per kv head serves its whole group."""
    n, _, dim = x.shape
    return x.to(dtype).reshape(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * n, dim)


def _from_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[Hkv, G * n, D] -> [n, H, D]."""
    kv_heads, gn, dim = x.shape
    return x.view(kv_heads, gn // n, n, dim).permute(2, 0, 1, 3).reshape(n, -1, dim)


def _masked_scores(qh_scaled, kh, q_doc, q_pos, k_doc, k_pos, causal: bool, n: int) -> torch.Tensor:
    """(scale*q).k with invisible pairs at -inf; qh [Hkv, G*n, D], kh [Hkv, m, D] -> [Hkv, G, n, m]."""
    kv_heads, gn, _ = qh_scaled.shape
    m = kh.shape[1]
    s = torch.bmm(qh_scaled, kh.transpose(1, 2)).view(kv_heads, gn // n, n, m)
    visible = q_doc[:, None] == k_doc[None, :]
    if causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
    if bool(visible.all()):
        return s
    # One [n, m] bias broadcast over all heads: a broadcast add is several
    # times faster on CPU than masked_fill_ with a broadcast mask.
    bias = torch.full((n, m), _NEG_INF, dtype=s.dtype, device=s.device).masked_fill_(visible, 0.0)
    return s.add_(bias)


def block_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one block of keys.

    q: [Tq, H, D]; k, v: [Tk, Hkv, D] (H % Hkv == 0); q_doc, q_pos: [Tq] int;
    k_doc, k_pos: [Tk] int. Returns out [Tq, H, D] and lse [H, Tq] (natural log
    of the softmax denominator) in the compute dtype (fp32, or fp64 for fp64
    inputs). Rows with no visible key get out = 0, lse = -inf.
    """
    kv_heads, group = validate_args("block_attn_fwd", q, k, v, q_doc, q_pos, k_doc, k_pos)
    tq, heads, dim = q.shape
    dtype = compute_dtype(q, k, v)
    out = torch.zeros(tq, heads, dim, dtype=dtype, device=q.device)
    lse = torch.full((heads, tq), _NEG_INF, dtype=dtype, device=q.device)
    chunks = _plan_chunks(q_doc, q_pos, k_doc, k_pos, causal, heads, dtype.itemsize)
    if not chunks:
        return out, lse
    kt = k.to(dtype).transpose(0, 1).contiguous()  # [Hkv, Tk, D]
    vt = v.to(dtype).transpose(0, 1).contiguous()
    for q0, q1, k0, k1 in chunks:
        if k1 == k0:
            continue
        n = q1 - q0
        qh = _to_heads(q[q0:q1], kv_heads, group, dtype) * scale
        s = _masked_scores(qh, kt[:, k0:k1], q_doc[q0:q1], q_pos[q0:q1], k_doc[k0:k1], k_pos[k0:k1], causal, n)
        row_max = s.amax(dim=-1, keepdim=True)
        # A fully masked row has max -inf; shifting by 0 instead keeps exp() at 0, not NaN.
        row_max = torch.where(row_max == _NEG_INF, 0.0, row_max)
        p = s.sub_(row_max).exp_()
        denom = p.sum(dim=-1, keepdim=True)  # [Hkv, G, n, 1]
        o = torch.bmm(p.view(kv_heads, group * n, k1 - k0), vt[:, k0:k1])
        o = o.view(kv_heads, group, n, dim) / torch.where(denom > 0, denom, 1.0)
        out[q0:q1] = _from_heads(o.view(kv_heads, group * n, dim), n)
        lse[:, q0:q1] = (row_max + denom.log()).view(heads, n)  # log(0) = -inf for masked rows
    return out, lse


def block_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one key block's share of attention.

    dout, out: [Tq, H, D]; lse: [H, Tq]. out and lse must be the FINAL values
    for these queries (merged over all key blocks), so p = exp(scale*q.k - lse)
    over this block need not sum to 1 and delta = rowsum(dout * out) is the
    global one. delta: optional [H, Tq] in the compute dtype, precomputed once
    by a caller that runs several key blocks (ring); computed here from dout
    and out otherwise. Returns dq [Tq, H, D], dk, dv [Tk, Hkv, D] in the compute dtype;
    GQA gradients are summed over the query heads of each group. Rows with
    lse = -inf contribute nothing.
    """
    kv_heads, group = validate_args("block_attn_bwd", q, k, v, q_doc, q_pos, k_doc, k_pos)
    tq, heads, dim = q.shape
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"block_attn_bwd: dout {tuple(dout.shape)} and out {tuple(out.shape)} must match q {tuple(q.shape)}"
        )
    if lse.shape != (heads, tq):
        raise ValueError(f"block_attn_bwd: lse must be [heads, tokens] = {(heads, tq)}, got {tuple(lse.shape)}")
    dtype = compute_dtype(q, k, v)
    delta = block_delta(dout, out, dtype) if delta is None else check_delta("block_attn_bwd", delta, heads, tq)
    dq = torch.zeros(tq, heads, dim, dtype=dtype, device=q.device)
    dkt = torch.zeros(kv_heads, k.shape[0], dim, dtype=dtype, device=k.device)  # [Hkv, Tk, D]
    dvt = torch.zeros_like(dkt)
    chunks = _plan_chunks(q_doc, q_pos, k_doc, k_pos, causal, heads, dtype.itemsize)
    if chunks:
        kt = k.to(dtype).transpose(0, 1).contiguous()
        vt = v.to(dtype).transpose(0, 1).contiguous()
    for q0, q1, k0, k1 in chunks:
        if k1 == k0:
            continue
        n, m = q1 - q0, k1 - k0
        # scale * q serves both s and dk; not in place, as it may be a view of q.
        qh = _to_heads(q[q0:q1], kv_heads, group, dtype) * scale
        doh = _to_heads(dout[q0:q1], kv_heads, group, dtype)
        row_delta = delta[:, q0:q1].to(dtype).reshape(kv_heads, group * n, 1)
        row_lse = lse[:, q0:q1].to(dtype).reshape(kv_heads, group, n, 1)
        # lse = -inf marks a row with no visible key anywhere: shifting by +inf
        # makes every p of that row exactly 0.
        row_lse = torch.where(row_lse == _NEG_INF, float("inf"), row_lse)
        s = _masked_scores(qh, kt[:, k0:k1], q_doc[q0:q1], q_pos[q0:q1], k_doc[k0:k1], k_pos[k0:k1], causal, n)
        p = s.sub_(row_lse).exp_().view(kv_heads, group * n, m)
        dvt[:, k0:k1] += torch.bmm(p.transpose(1, 2), doh)
        ds = torch.bmm(doh, vt[:, k0:k1].transpose(1, 2)).sub_(row_delta).mul_(p)  # p * (dp - delta)
        dq[q0:q1] = _from_heads(torch.bmm(ds, kt[:, k0:k1]).mul_(scale), n)
        dkt[:, k0:k1] += torch.bmm(ds.transpose(1, 2), qh)
    return dq, dkt.transpose(0, 1).contiguous(), dvt.transpose(0, 1).contiguous()


def block_delta(dout: torch.Tensor, out: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """delta = rowsum(dout * out) in ``dtype``: [Tq, H, D] x2 -> [H, Tq] (the backward's row term)."""
    return (dout.to(dtype) * out.to(dtype)).sum(-1).t().contiguous()


def check_delta(fn: str, delta: torch.Tensor, heads: int, tq: int) -> torch.Tensor:
    if delta.shape != (heads, tq):
        raise ValueError(f"{fn}: delta must be [heads, tokens] = {(heads, tq)}, got {tuple(delta.shape)}")
    return delta


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions of the same queries over disjoint key sets.

    out_*: [T, H, D]; lse_*: [H, T]. Returns (out [T, H, D], lse [H, T]) in fp32
    (fp64 for fp64 inputs). A side with lse = -inf contributes nothing; both
    -inf gives out = 0, lse = -inf.
    """
    if out_a.dim() != 3 or out_a.shape != out_b.shape:
        raise ValueError(
            f"merge: out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must be equal [tokens, heads, head_dim]"
        )
    t, heads, _ = out_a.shape
    if lse_a.shape != (heads, t) or lse_b.shape != (heads, t):
        raise ValueError(
            f"merge: lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must be [heads, tokens] = {(heads, t)}"
        )
    dtype = compute_dtype(out_a, lse_a, out_b, lse_b)
    la, lb = lse_a.to(dtype), lse_b.to(dtype)
    lse = torch.logaddexp(la, lb)
    # Weights from the lse difference, not exp(la - lse): at |lse| ~ 1e3 the
    # latter loses ~1e-4 relative in fp32, the difference stays exact.
    empty = lse == _NEG_INF
    diff = torch.where(empty, 0.0, la - lb)  # -inf - -inf would be NaN
    wa = torch.where(empty, 0.0, torch.sigmoid(diff))
    wb = torch.where(empty, 0.0, torch.sigmoid(-diff))
    # [T, H, 1], contiguous: a transposed weight would make the broadcast result transposed too,
    # and the next layer's reshape of the attention output would then copy it.
    wa = wa.t().contiguous().unsqueeze(-1)
    wb = wb.t().contiguous().unsqueeze(-1)
    return wa * out_a.to(dtype) + wb * out_b.to(dtype), lse
