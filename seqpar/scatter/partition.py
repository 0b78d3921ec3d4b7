"""Sequence bucketing and micro-batch chunking for the planner (pure).

    buckets = bucket_lengths([100, 120, 5000, 5100], q=2)   # [(120, [0, 1]), (5100, [2, 3])]
    chunks = chunk_by_cost(cm, lengths, m=3)                  # lists of sequence ids, or None

Bucketing: a DP over sorted lengths into Q contiguous buckets minimising the padding sum of
(bucket max - length), so the MILP works on Q bucket counts instead of one variable per
sequence. Chunking: sequences sorted descending are cut into M contiguous chunks minimising the
largest predicted micro-batch cost (a per-micro-batch lower bound: quadratic in length, unlike
tokens), each chunk within the cluster's R x K tokens.
"""

from __future__ import annotations

import numpy as np

from seqpar.scatter.costmodel import CostModel


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
    inf = float("inf")
    # dp[k][j]: min padding of the first j distinct values in k buckets; bucket (i..j-1) costs
    # (count) * v[j-1] - sum.
    dp = np.full((q + 1, u + 1), inf)
    arg = np.zeros((q + 1, u + 1), dtype=np.int64)
    dp[0][0] = 0.0
    for k in range(1, q + 1):
        for j in range(1, u + 1):
            i = np.arange(0, j)
            cost = dp[k - 1][i] + (cc[j] - cc[i]) * v[j - 1] - (cs[j] - cs[i])
            best = int(np.argmin(cost))
            dp[k][j], arg[k][j] = cost[best], best
    out, j, k = [], u, q
    while j > 0:
        i = int(arg[k][j])
        ids = [int(x) for x in order[starts[i]:starts[j - 1] + counts[j - 1]]]
        out.append((int(vals[j - 1]), ids))
        j, k = i, k - 1
    return out[::-1]


def padded_total(buckets: list[tuple[int, list[int]]]) -> int:
    return sum(m * len(ids) for m, ids in buckets)


def adaptive_buckets(cm: CostModel, lengths, ids: list[int], q: int) -> list[tuple[int, list[int]]]:
    """Buckets of the sequences ``ids``; q doubles while the padded total exceeds (actual + R*K) / 2.

    Returned indices are the global sequence ids.
    """
    sub = [int(lengths[i]) for i in ids]
    actual = sum(sub)
    room = (actual + cm.world * cm.capacity) / 2
    while True:
        b = bucket_lengths(sub, q)
        if padded_total(b) <= room or q >= len(sub):
            return [(m, [ids[i] for i in members]) for m, members in b]
        q *= 2


def seq_work(cm: CostModel, s: int, allow_degree1: bool = True) -> tuple[float, float]:
    """(min rank-seconds d * seq_cost, min seconds group_time) of one sequence over feasible degrees."""
    lo = max(cm.min_degree(s), 1 if allow_degree1 else 2)
    best_w = best_t = float("inf")
    d = lo
    while d <= cm.max_degree:
        c, _ = cm.best_seq_cost(s, d)
        best_w = min(best_w, d * c)
        best_t = min(best_t, c + cm.group_const(d))
        d *= 2
    return best_w, best_t


def min_microbatches(cm: CostModel, lengths) -> int:
    """M_min = ceil(total tokens / (R x K))."""
    return max(1, -(-int(sum(int(s) for s in lengths)) // (cm.world * cm.capacity)))


def chunk_by_cost(cm: CostModel, lengths, m: int, allow_degree1: bool = True, work=None) -> list[list[int]] | None:
    """Cut the sequences (sorted descending) into at most m contiguous chunks minimising the
    largest predicted cost b1 + max(sum work / R, longest single-sequence time); each chunk
    holds at most R x K tokens. None when m chunks cannot hold them."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: -int(lengths[i]))
    if work is None:
        work = [seq_work(cm, int(s), allow_degree1) for s in lengths]
    cap = cm.world * cm.capacity

    def cost(w_sum: float, t_max: float) -> float:
        return cm.b1 + max(w_sum / cm.world, t_max)

    def fill(thr: float) -> list[list[int]] | None:
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
    best = fill(hi)
    if best is None:
        return None
    lo = cm.b1 + total_w / (cm.world * m)
    for _ in range(40):
        mid = (lo + hi) / 2
        got = fill(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
        if hi - lo <= 1e-6 * hi:
            break
    return best
