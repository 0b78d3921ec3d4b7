"""Sequence bucketing and micro-batch chunking for the planner (pure).

    buckets = bucket_lengths([100, 120, 5000, 5100], q=2)   # [(120, [0, 1]), (5100, [2, 3])]
    chunks = chunk_by_cost(cm, lengths, 3, seq_work(tab))     # lists of sequence ids, or None

Bucketing: a DP over sorted lengths into Q contiguous buckets minimising the padding sum of
(bucket max - length), so the MILP works on Q bucket counts instead of one variable per
sequence. Chunking: sequences sorted descending are cut into M contiguous chunks minimising the
largest predicted micro-batch cost (a per-micro-batch lower bound: quadratic in length, unlike
tokens), each chunk within the cluster's R x K tokens.
"""

from __future__ import annotations

import numpy as np

from seqpar.scatter.costmodel import CostModel, CostTable


def bucket_lengths(lengths, q: int) -> list[tuple[int, list[int]]]:
    """Group sequence indices into at most q buckets by length, minimising total padding.

    Returns [(bucket max length, [indices])] in increasing length. q >= number of distinct
    lengths gives exact buckets (one per distinct length, no padding).
    """
    if len(lengths) == 0:
        return []
    order = np.argsort(np.asarray(lengths), kind="stable")
    vals, starts, counts = np.unique(np.asarray(lengths)[order], return_index=True, return_counts=True)
    u = len(vals)
    if q >= u:
        return [(int(vals[i]), [int(x) for x in order[starts[i]:starts[i] + counts[i]]]) for i in range(u)]
    v = vals.astype(np.float64)
    c = counts.astype(np.float64)
    cc = np.concatenate([[0.0], np.cumsum(c)])
    cs = np.concatenate([[0.0], np.cumsum(c * v)])
    # dp[k][j]: min padding of the first j distinct values in k buckets; bucket (i..j-1) costs
    # count x v[j-1] - sum. One (u+1) x (u+1) matrix per k, i < j only.
    i_idx = np.arange(u + 1)[None, :]
    j_idx = np.arange(u + 1)[:, None]
    vj = np.concatenate([[0.0], v])[:, None]
    seg = (cc[:, None] - cc[None, :]) * vj - (cs[:, None] - cs[None, :])  # [j, i]
    seg = np.where(i_idx < j_idx, seg, np.inf)
    dp = np.full((q + 1, u + 1), np.inf)
    arg = np.zeros((q + 1, u + 1), dtype=np.int64)
    dp[0][0] = 0.0
    for k in range(1, q + 1):
        tot = dp[k - 1][None, :] + seg
        arg[k] = np.argmin(tot, axis=1)
        dp[k] = tot[np.arange(u + 1), arg[k]]
    out, j, k = [], u, q
    while j > 0:
        i = int(arg[k][j])
        ids = [int(x) for x in order[starts[i]:starts[j - 1] + counts[j - 1]]]
        out.append((int(vals[j - 1]), ids))
        j, k = i, k - 1
    return out[::-1]


def padded_total(buckets: list[tuple[int, list[int]]]) -> int:
    return sum(m * len(ids) for m, ids in buckets)


def adaptive_buckets(cm: CostModel, lengths, ids: list[int], q: int, q_max: int = 64) -> list[tuple[int, list[int]]]:
    """Buckets of the sequences ``ids``; q doubles while the padded total exceeds (actual + R*K) / 2,
    up to q_max (the DP costs q x distinct^2 and the MILP grows with q; past it the MILP may find
    the padded micro-batch infeasible and greedy is kept). Returned indices are global ids.
    """
    sub = [int(lengths[i]) for i in ids]
    actual = sum(sub)
    room = (actual + cm.world * cm.capacity) / 2
    while True:
        b = bucket_lengths(sub, q)
        if padded_total(b) <= room or q >= len(sub) or q >= q_max:
            return [(m, [ids[i] for i in members]) for m, members in b]
        q *= 2


def seq_work(tab: CostTable, allow_degree1: bool = True) -> list[tuple[float, float]]:
    """Per sequence: (least rank-seconds d x cost, least seconds as a group of its own incl. b1, b2),
    over the feasible degrees d >= minSP (and >= 2 without degree 1)."""
    cm = tab.cm
    n = len(tab.lengths)
    w = np.full(n, np.inf)
    t = np.full(n, np.inf)
    for d in tab.degrees:
        if d < (1 if allow_degree1 else 2):
            continue
        ok = tab.min_degree <= d
        w = np.where(ok, np.minimum(w, d * tab.best[d]), w)
        t = np.where(ok, np.minimum(t, tab.best[d] + cm.group_const(d)), t)
    return list(zip(w.tolist(), t.tolist()))


def min_microbatches(cm: CostModel, lengths) -> int:
    """M_min = ceil(total tokens / (R x K))."""
    return max(1, -(-int(sum(int(s) for s in lengths)) // (cm.world * cm.capacity)))


def chunk_by_cost(cm: CostModel, lengths, m: int, work: list[tuple[float, float]],
                  fill: float = 1.0) -> list[list[int]] | None:
    """Cut the sequences (sorted descending) into at most m contiguous chunks minimising the
    largest predicted cost max(b1 + sum work / R, longest single-sequence time); each chunk
    holds at most fill x R x K tokens. None when m chunks cannot hold them. (The spec's
    chunking: the greedy baseline and the planner's fallback; see ``levels`` for the default.)"""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: -int(lengths[i]))
    cap = fill * cm.world * cm.capacity

    def cost(w_sum: float, t_max: float) -> float:
        return max(cm.b1 + w_sum / cm.world, t_max)

    def cut(thr: float) -> list[list[int]] | None:
        chunks: list[list[int]] = []
        cur: list[int] = []
        w_sum = t_max = 0.0
        tokens = 0
        for i in order:
            w, t = work[i]
            s = int(lengths[i])
            if cur and (tokens + s > cap or cost(w_sum + w, max(t_max, t)) > thr):
                chunks.append(cur)
                cur, w_sum, t_max, tokens = [], 0.0, 0.0, 0
                if len(chunks) >= m:
                    return None
            cur.append(i)
            w_sum += w
            t_max = max(t_max, t)
            tokens += s
        if cur:
            chunks.append(cur)
        return chunks if len(chunks) <= m else None

    total_w = sum(w for w, _ in work)
    hi = cost(total_w, max(t for _, t in work)) + 1e-9
    best = cut(hi)
    if best is None:
        return None
    lo = cm.b1 + total_w / (cm.world * m)
    for _ in range(40):
        mid = (lo + hi) / 2
        got = cut(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
        if hi - lo <= 1e-6 * hi:
            break
    return best
