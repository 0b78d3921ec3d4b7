"""Group assignment of one micro-batch as a MILP on HiGHS (``highspy``), warm-started (pure).

    groups = solve_groups(cm, lengths, ids, buckets, warm=greedy, time_limit_s=0.5)

Variables, for each power-of-two degree d and slot j < G_d (G_d = min(R // d, sequences)):
y[d,j] in {0,1} (group used), x[d,j,q] in {0..n_q} (sequences of bucket q in it, only where
minSP(bucket max) <= d), and the makespan Mk. Equal-degree groups are interchangeable, so slots
are ordered (y and token load non-increasing in j): the symmetry reduction. Constraints:
per-group time <= Mk; tokens <= d K y; non-empty when used; sum d y == R (all ranks busy) or
<= R; every bucket's sequences placed. One algorithm per degree (the cheapest for the batch).
Bucket counts are then mapped back to actual sequences (longest first, to the least-loaded
slot with room), and the caller keeps whichever of MILP and greedy is faster on actual lengths.
"""

from __future__ import annotations

import highspy
import numpy as np

from seqpar.scatter.costmodel import CostModel, degrees_upto
from seqpar.scatter.greedy import Grouping
from seqpar.scatter.highs import highs_model


def solve_groups(cm: CostModel, lengths, ids: list[int], buckets: list[tuple[int, list[int]]],
                 warm: Grouping | None = None, time_limit_s: float | None = 1.0, allow_degree1: bool = True,
                 all_busy: bool = True, node_limit: int | None = None) -> Grouping | None:
    """MILP group assignment of the sequences ``ids`` (bucketed); None when HiGHS finds nothing.

    time_limit_s: HiGHS's wall-clock limit (None: none); node_limit: its branch-and-bound node
    limit (None: none). With a node limit and no clock the result depends only on the inputs."""
    R, K = cm.world, cm.capacity
    n_seq = len(ids)
    Lq = [m for m, _ in buckets]
    nq = [len(m) for _, m in buckets]
    Q = len(buckets)
    bucket_of = {i: q for q, (_, members) in enumerate(buckets) for i in members}
    degrees = [d for d in degrees_upto(R) if d >= (1 if allow_degree1 else 2)]
    col_lo: list[float] = []
    col_hi: list[float] = []
    integ: list = []
    I, C = highspy.HighsVarType.kInteger, highspy.HighsVarType.kContinuous

    def var(lo: float, hi: float, kind) -> int:
        col_lo.append(lo)
        col_hi.append(hi)
        integ.append(kind)
        return len(col_lo) - 1

    mk = var(0.0, highspy.kHighsInf, C)
    slots = []  # (d, y index, {q: x index}, cost per q, const)
    for d in degrees:
        allowed = [q for q in range(Q) if cm.min_degree(Lq[q]) <= d]
        if not allowed:
            continue
        algo = cm.degree_algorithm(d, [Lq[q] for q in allowed])
        cost = {q: cm.seq_cost(Lq[q], d, algo) for q in allowed}
        for _ in range(min(R // d, n_seq)):
            y = var(0.0, 1.0, I)
            xs = {q: var(0.0, float(nq[q]), I) for q in allowed}
            slots.append((d, y, xs, cost, cm.group_const(d)))
    rows: list[tuple[dict[int, float], float, float]] = []
    inf = highspy.kHighsInf
    for d, y, xs, cost, const in slots:
        rows.append(({**{xs[q]: cost[q] for q in xs}, y: const, mk: -1.0}, -inf, 0.0))
        rows.append(({**{xs[q]: float(Lq[q]) for q in xs}, y: -float(d * K)}, -inf, 0.0))
        rows.append(({**{xs[q]: 1.0 for q in xs}, y: -1.0}, 0.0, inf))
    for k in range(1, len(slots)):
        (d0, y0, x0, _, _), (d1, y1, x1, _, _) = slots[k - 1], slots[k]
        if d0 == d1:  # symmetry: used slots first, heavier first
            rows.append(({y0: 1.0, y1: -1.0}, 0.0, inf))
            row = {x0[q]: float(Lq[q]) for q in x0}
            for q in x1:
                row[x1[q]] = row.get(x1[q], 0.0) - float(Lq[q])
            rows.append((row, 0.0, inf))
    rows.append(({y: float(d) for d, y, _, _, _ in slots}, float(R) if all_busy else 0.0, float(R)))
    for q in range(Q):
        row = {xs[q]: 1.0 for _, _, xs, _, _ in slots if q in xs}
        if not row:
            return None
        rows.append((row, float(nq[q]), float(nq[q])))

    cost_vec = np.zeros(len(col_lo))
    cost_vec[mk] = 1.0
    opts: dict = {"mip_rel_gap": 1e-3}
    if node_limit is not None:
        opts["mip_max_nodes"] = int(node_limit)
    h = highs_model(cost_vec, col_lo, col_hi, rows, integ, None if time_limit_s is None else max(time_limit_s, 0.01),
                    **opts)
    if warm:
        start = _warm_start(cm, lengths, warm, slots, bucket_of, Lq, len(col_lo), mk)
        if start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = list(start)
            sol.value_valid = True
            h.setSolution(sol)
    h.run()
    if h.getInfo().primal_solution_status != 2:  # 2 = feasible
        return None
    val = np.asarray(h.getSolution().col_value)
    return _to_groups(lengths, buckets, slots, val)


def _warm_start(cm, lengths, warm: Grouping, slots, bucket_of, Lq, ncol: int, mk: int) -> np.ndarray | None:
    """Greedy groups as a MILP point: each group to a free slot of its degree, heaviest first."""
    x = np.zeros(ncol)
    free: dict[int, list] = {}
    for s in slots:
        free.setdefault(s[0], []).append(s)
    worst = 0.0
    for d, ids in sorted(warm, key=lambda g: -sum(Lq[bucket_of[i]] for i in g[1])):
        if not free.get(d):
            return None
        _, y, xs, cost, const = free[d].pop(0)
        x[y] = 1.0
        t = const
        for i in ids:
            q = bucket_of[i]
            if q not in xs:
                return None
            x[xs[q]] += 1.0
            t += cost[q]
        worst = max(worst, t)
    x[mk] = worst
    return x


def _to_groups(lengths, buckets, slots, val: np.ndarray) -> Grouping:
    """Bucket counts per slot -> actual sequences: longest first to the least-loaded slot with room."""
    groups: list[tuple[int, list[int]]] = []
    want: list[dict[int, int]] = []
    for d, y, xs, _, _ in slots:
        if val[y] > 0.5:
            groups.append((d, []))
            want.append({q: int(round(val[xs[q]])) for q in xs if val[xs[q]] > 0.5})
    load = [0] * len(groups)
    for q, (_, members) in enumerate(buckets):
        for i in sorted(members, key=lambda i: -int(lengths[i])):
            cands = [g for g in range(len(groups)) if want[g].get(q, 0) > 0]
            g = min(cands, key=lambda g: load[g] / groups[g][0])
            want[g][q] -= 1
            groups[g][1].append(i)
            load[g] += int(lengths[i])
    return [g for g in groups if g[1]]
