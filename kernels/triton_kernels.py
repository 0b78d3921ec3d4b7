"""Triton kernels of the block-attention contract (FlashAttention-2 tiling).

Three kernels: the forward (one program per query tile and head, online
softmax over the key tiles in fp32), dK/dV (one program per key tile and KV
head; it loops over every query head of its GQA group, so no two programs
write the same gradient and the backward needs no atomics: it is
deterministic) and dQ (one program per query tile and head). Host code lives in
triton_attn.py.

Masking follows the contract from per-token document ids and positions, so any
shard layout works. Each visited tile is classified from the min/max of its
tokens' documents and positions: EMPTY (skipped: no K/V load, no dot), FULL
(one document, in bounds and, if causal, all keys at or before all queries: no
mask computed) or PARTIAL (mask computed). The loop over the other axis is
further bounded by per-token visible ranges (ranges.py: the query's document,
and its causal prefix, when tokens are sorted; the whole axis otherwise).

Scores are kept in log2 units (scale * log2(e) folded into q.k) so the
exponentials are exp2.
"""

from __future__ import annotations

import triton
import triton.language as tl

_BIG = tl.constexpr(2147483647)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs must not silently drop to tf32: the fp32 path is checked at 1e-5.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _minmax(doc, pos, valid):
    """Per-tile (doc min, doc max, pos min, pos max) over the in-bounds tokens."""
    d_min = tl.min(tl.where(valid, doc, _BIG), 0)
    d_max = tl.max(tl.where(valid, doc, -_BIG), 0)
    p_min = tl.min(tl.where(valid, pos, _BIG), 0)
    p_max = tl.max(tl.where(valid, pos, -_BIG), 0)
    return d_min, d_max, p_min, p_max


@triton.jit
def _tile_meta(Doc, Pos, offs, valid):
    """Documents and positions of one tile's tokens, with their (doc min, doc max, pos min, pos max)."""
    doc = tl.load(Doc + offs, mask=valid, other=0)
    pos = tl.load(Pos + offs, mask=valid, other=0)
    d_min, d_max, p_min, p_max = _minmax(doc, pos, valid)
    return doc, pos, d_min, d_max, p_min, p_max


@triton.jit
def _span(Lo, Hi, offs, valid):
    """[lo, hi) of the other axis covering what any token of this tile can see (ranges.py)."""
    lo = tl.min(tl.load(Lo + offs, mask=valid, other=_BIG), 0)
    hi = tl.max(tl.load(Hi + offs, mask=valid, other=0), 0)
    return lo, hi


@triton.jit
def _row_ptrs(Ptr, offs, stride_t, head_offset, offs_d):
    # int64 token offsets: tokens x heads x head_dim passes 2^31 at ~1M tokens of 16 x 128.
    return Ptr + offs.to(tl.int64)[:, None] * stride_t + head_offset + offs_d[None, :]


@triton.jit
def _rows(Ptr, offs, stride_t, head_offset, offs_d, mask, UPCAST: tl.constexpr):
    """[len(offs), BLOCK_D] rows of one head; fp32 when UPCAST (the interpreter's bf16 is wrong)."""
    x = tl.load(_row_ptrs(Ptr, offs, stride_t, head_offset, offs_d), mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _classify(qd_min, qd_max, qp_min, qp_max, kd_min, kd_max, kp_min, kp_max, in_bounds, CAUSAL: tl.constexpr):
    """(busy, full): busy is False for an EMPTY tile; full marks a tile that needs no mask."""
    busy = (kd_min <= qd_max) & (kd_max >= qd_min)
    full = (qd_min == qd_max) & (kd_min == kd_max) & (qd_min == kd_min) & in_bounds
    if CAUSAL:
        busy = busy & (kp_min <= qp_max)
        full = full & (kp_max <= qp_min)
    return busy, full


@triton.jit
def _visible(q_doc, q_pos, k_doc, k_pos, q_valid, k_valid, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the contract's rule, out-of-bounds tokens excluded."""
    vis = (q_doc[:, None] == k_doc[None, :]) & q_valid[:, None] & k_valid[None, :]
    if CAUSAL:
        vis = vis & (k_pos[None, :] <= q_pos[:, None])
    return vis


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, QDoc, QPos, KDoc, KPos, KLo, KHi, Classes,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    Tq, Tk, qk_scale, n_kb, len_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, RECORD: tl.constexpr,
):
    """out [Tq, H, D] fp32, lse [H, Tq] fp32 (natural log); grid (cdiv(Tq, BLOCK_M), H)."""
    # Last query tiles first: under a causal mask they have the most keys, and
    # starting them early keeps the final wave of programs short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_valid = offs_m < Tq
    d_valid = offs_d < HEAD_DIM
    q_doc, q_pos, qd_min, qd_max, qp_min, qp_max = _tile_meta(QDoc, QPos, offs_m, q_valid)
    q_in = pid_m * BLOCK_M + BLOCK_M <= Tq
    lo, hi = _span(KLo, KHi, offs_m, q_valid)
    q = _rows(Q, offs_m, stride_qt, h * stride_qh, offs_d, q_valid[:, None] & d_valid[None, :], UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_k = k0 + offs_n
        k_valid = offs_k < Tk
        k_doc, k_pos, kd_min, kd_max, kp_min, kp_max = _tile_meta(KDoc, KPos, offs_k, k_valid)
        busy, full = _classify(
            qd_min, qd_max, qp_min, qp_max, kd_min, kd_max, kp_min, kp_max, q_in & (k0 + BLOCK_N <= Tk), CAUSAL
        )
        if RECORD:
            tile = tl.where(busy, tl.where(full, 1, 2), 0)
            tl.store(Classes + pid_m * n_kb + k0 // BLOCK_N, tile.to(tl.int8))
        if busy:
            kd_mask = k_valid[:, None] & d_valid[None, :]
            k = _rows(K, offs_k, stride_kt, hk * stride_kh, offs_d, kd_mask, UPCAST)
            v = _rows(V, offs_k, stride_vt, hk * stride_vh, offs_d, kd_mask, UPCAST)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale
            if not full:
                s = tl.where(_visible(q_doc, q_pos, k_doc, k_pos, q_valid, k_valid, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps max -inf; shift by 0 so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0.0, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    tl.store(_row_ptrs(Out, offs_m, stride_ot, h * stride_oh, offs_d), out, mask=q_valid[:, None] & d_valid[None, :])
    tl.store(Lse + h.to(tl.int64) * Tq + offs_m, lse, mask=q_valid)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse2, Delta, DK, DV, QDoc, QPos, KDoc, KPos, QLo, QHi,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh,
    Tq, Tk, qk_scale, sm_scale, len_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dk, dv [Tk, Hkv, D] fp32 for one key tile, summed over the GROUP query heads; grid (cdiv(Tk, BLOCK_N), Hkv).

    Lse2 = lse * log2(e) with -inf replaced by +inf (rows that saw nothing get p = 0);
    Delta = rowsum(dout * out), both [H, Tq] fp32.
    """
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_valid = offs_k < Tk
    d_valid = offs_d < HEAD_DIM
    kd_mask = k_valid[:, None] & d_valid[None, :]
    k_doc, k_pos, kd_min, kd_max, kp_min, kp_max = _tile_meta(KDoc, KPos, offs_k, k_valid)
    k_in = pid_n * BLOCK_N + BLOCK_N <= Tk
    lo, hi = _span(QLo, QHi, offs_k, k_valid)
    k = _rows(K, offs_k, stride_kt, hk * stride_kh, offs_d, kd_mask, UPCAST)
    v = _rows(V, offs_k, stride_vt, hk * stride_vh, offs_d, kd_mask, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for q0 in range(lo // BLOCK_M * BLOCK_M, hi, BLOCK_M):
        offs_m = q0 + offs_m0
        q_valid = offs_m < Tq
        qd_mask = q_valid[:, None] & d_valid[None, :]
        q_doc, q_pos, qd_min, qd_max, qp_min, qp_max = _tile_meta(QDoc, QPos, offs_m, q_valid)
        busy, full = _classify(
            qd_min, qd_max, qp_min, qp_max, kd_min, kd_max, kp_min, kp_max, k_in & (q0 + BLOCK_M <= Tq), CAUSAL
        )
        if busy:
            for g in range(GROUP):
                h = hk * GROUP + g
                q = _rows(Q, offs_m, stride_qt, h * stride_qh, offs_d, qd_mask, UPCAST)
                do = _rows(DO, offs_m, stride_dot, h * stride_doh, offs_d, qd_mask, UPCAST)
                lse2 = tl.load(Lse2 + h * Tq + offs_m, mask=q_valid, other=float("inf"))
                delta = tl.load(Delta + h * Tq + offs_m, mask=q_valid, other=0.0)
                p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse2[:, None])
                if not full:
                    p = tl.where(_visible(q_doc, q_pos, k_doc, k_pos, q_valid, k_valid, CAUSAL), p, 0.0)
                dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
                ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
                dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
    dk = dk * sm_scale
    tl.store(_row_ptrs(DK, offs_k, stride_dkt, hk * stride_dkh, offs_d), dk, mask=kd_mask)
    tl.store(_row_ptrs(DV, offs_k, stride_dkt, hk * stride_dkh, offs_d), dv, mask=kd_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse2, Delta, DQ, QDoc, QPos, KDoc, KPos, KLo, KHi,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    Tq, Tk, qk_scale, sm_scale, len_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dq [Tq, H, D] fp32 for one query tile and head; grid (cdiv(Tq, BLOCK_M), H)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest tiles first, as in the forward
    h = tl.program_id(1)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_valid = offs_m < Tq
    d_valid = offs_d < HEAD_DIM
    qd_mask = q_valid[:, None] & d_valid[None, :]
    q_doc, q_pos, qd_min, qd_max, qp_min, qp_max = _tile_meta(QDoc, QPos, offs_m, q_valid)
    q_in = pid_m * BLOCK_M + BLOCK_M <= Tq
    lo, hi = _span(KLo, KHi, offs_m, q_valid)
    q = _rows(Q, offs_m, stride_qt, h * stride_qh, offs_d, qd_mask, UPCAST)
    do = _rows(DO, offs_m, stride_dot, h * stride_doh, offs_d, qd_mask, UPCAST)
    lse2 = tl.load(Lse2 + h * Tq + offs_m, mask=q_valid, other=float("inf"))
    delta = tl.load(Delta + h * Tq + offs_m, mask=q_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_k = k0 + offs_n
        k_valid = offs_k < Tk
        k_doc, k_pos, kd_min, kd_max, kp_min, kp_max = _tile_meta(KDoc, KPos, offs_k, k_valid)
        busy, full = _classify(
            qd_min, qd_max, qp_min, qp_max, kd_min, kd_max, kp_min, kp_max, q_in & (k0 + BLOCK_N <= Tk), CAUSAL
        )
        if busy:
            kd_mask = k_valid[:, None] & d_valid[None, :]
            k = _rows(K, offs_k, stride_kt, hk * stride_kh, offs_d, kd_mask, UPCAST)
            v = _rows(V, offs_k, stride_vt, hk * stride_vh, offs_d, kd_mask, UPCAST)
            p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse2[:, None])
            if not full:
                p = tl.where(_visible(q_doc, q_pos, k_doc, k_pos, q_valid, k_valid, CAUSAL), p, 0.0)
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    tl.store(_row_ptrs(DQ, offs_m, stride_dqt, h * stride_dqh, offs_d), dq, mask=qd_mask)
