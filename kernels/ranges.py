"""Which keys a query can see, and which tiles a kernel must compute.

Pure torch on any device, shared by the reference (chunk planning) and the
Triton kernels (loop bounds and tile classes). The mask rule is the contract's:
a query sees a key iff same document and (not causal or k_pos <= q_pos).
"""

from __future__ import annotations

import torch

# Tile classes, as the Triton kernels report them in their debug output.
NOT_VISITED, EMPTY, FULL, PARTIAL = -1, 0, 1, 2


def _sorted(x: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on x's device: x is non-decreasing. No host sync."""
    return (x[1:] >= x[:-1]).all()


def _lex(doc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(doc, pos) as one int64 ordered lexicographically; valid for 0 <= pos < 2^31."""
    return doc.long() * (1 << 31) + pos.long()


def key_ranges(q_doc, q_pos, k_doc, k_pos, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, [lo, hi) covering every key it can see. q_doc, q_pos: [Tq] int; k_doc, k_pos: [Tk] int.

    When keys are sorted by document, [lo, hi) is the query's document; when
    they are also sorted by (doc, pos), causal queries stop at their own
    position, which skips the upper triangle of each document. Otherwise the
    whole key axis [0, Tk). Computed on the tensors' device without a host sync
    (the sortedness tests select with torch.where), so kernels can call it per
    launch. Returns two int64 [Tq] tensors.
    """
    tk = k_doc.shape[0]
    if q_doc.shape[0] == 0 or tk == 0:
        zero = torch.zeros_like(q_doc, dtype=torch.long)
        return zero, zero
    kd, qd = k_doc.long().contiguous(), q_doc.long().contiguous()
    ok = _sorted(kd)
    lo = torch.where(ok, torch.searchsorted(kd, qd, right=False), 0)
    hi = torch.searchsorted(kd, qd, right=True)
    if causal:
        k_key = _lex(k_doc, k_pos).contiguous()
        lex_ok = ok & _sorted(k_key) & (k_pos.min() >= 0) & (q_pos.min() >= 0)
        hi = torch.where(lex_ok, torch.searchsorted(k_key, _lex(q_doc, q_pos).contiguous(), right=True), hi)
    return lo, torch.where(ok, hi, tk)


def query_ranges(q_doc, q_pos, k_doc, k_pos, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key, [lo, hi) covering every query that can see it: the mirror of key_ranges.

    For kernels that loop over queries for one key block (the dK/dV backward);
    [0, Tq) when the queries are not sorted by document. Returns two int64 [Tk] tensors.
    """
    tq = q_doc.shape[0]
    if tq == 0 or k_doc.shape[0] == 0:
        zero = torch.zeros_like(k_doc, dtype=torch.long)
        return zero, zero
    qd, kd = q_doc.long().contiguous(), k_doc.long().contiguous()
    ok = _sorted(qd)
    lo = torch.searchsorted(qd, kd, right=False)
    hi = torch.where(ok, torch.searchsorted(qd, kd, right=True), tq)
    if causal:
        q_key = _lex(q_doc, q_pos).contiguous()
        lex_ok = ok & _sorted(q_key) & (k_pos.min() >= 0) & (q_pos.min() >= 0)
        lo = torch.where(lex_ok, torch.searchsorted(q_key, _lex(k_doc, k_pos).contiguous(), right=False), lo)
    return torch.where(ok, lo, 0), hi


def loop_bounds(ranges, n_outer: int, block_outer: int, block_inner: int) -> tuple[list[int], list[int]]:
    """Per outer tile, [start, stop) of the inner loop, start aligned down to block_inner.

    ranges: the per-token (lo, hi) of key_ranges/query_ranges. This mirrors what
    the kernels compute from the same tensors, so tile_classes can predict their visits.
    """
    starts, stops = [], []
    for b in range(0, n_outer, block_outer):
        lo, hi = int(ranges[0][b : b + block_outer].min()), int(ranges[1][b : b + block_outer].max())
        starts.append(lo // block_inner * block_inner)
        stops.append(hi)
    return starts, stops


def classify_tile(q_doc, q_pos, k_doc, k_pos, causal: bool, full_shape: bool) -> int:
    """EMPTY, FULL or PARTIAL for one tile from its tokens' documents and positions (1-D int tensors).

    Decided from per-tile min/max only, as the kernels do: EMPTY when the
    document ranges do not overlap or (causal) every key is after every query;
    FULL when the whole tile is one document, in bounds (full_shape), and
    (causal) every key is at or before every query; else PARTIAL.
    """
    qd0, qd1, kd0, kd1 = int(q_doc.min()), int(q_doc.max()), int(k_doc.min()), int(k_doc.max())
    if kd0 > qd1 or kd1 < qd0 or (causal and int(k_pos.min()) > int(q_pos.max())):
        return EMPTY
    one_doc = qd0 == qd1 == kd0 == kd1
    if one_doc and full_shape and (not causal or int(k_pos.max()) <= int(q_pos.min())):
        return FULL
    return PARTIAL


def tile_classes(q_doc, q_pos, k_doc, k_pos, causal: bool, block_m: int, block_n: int) -> torch.Tensor:
    """The class of every (query tile, key tile) the forward kernel visits, NOT_VISITED elsewhere.

    Returns int8 [ceil(Tq / block_m), ceil(Tk / block_n)]; the Triton forward
    kernel writes the same matrix in its debug mode, which is how the tests see
    that all three classes are exercised.
    """
    tq, tk = q_doc.shape[0], k_doc.shape[0]
    out = torch.full((-(-tq // block_m), -(-tk // block_n)), NOT_VISITED, dtype=torch.int8)
    if tq == 0 or tk == 0:
        return out
    starts, stops = loop_bounds(key_ranges(q_doc, q_pos, k_doc, k_pos, causal), tq, block_m, block_n)
    for i, (start, stop) in enumerate(zip(starts, stops)):
        q0, q1 = i * block_m, min(tq, (i + 1) * block_m)
        for k0 in range(start, stop, block_n):
            k1 = min(tk, k0 + block_n)
            full_shape = q1 - q0 == block_m and k1 - k0 == block_n
            out[i, k0 // block_n] = classify_tile(
                q_doc[q0:q1], q_pos[q0:q1], k_doc[k0:k1], k_pos[k0:k1], causal, full_shape
            )
    return out
