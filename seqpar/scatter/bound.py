"""A step lower bound from a level MILP with integer group counts (pure; HiGHS via ``highspy``).

    lb, info = level_bound(cm, lengths, time_limit_s=2.0)   # seconds; info: dual bound, status, time

``planner.lower_bound``'s bounds (work, longest sequence, memory by threshold) and their LP
relaxations treat ranks and micro-batches as fluids; they miss that a long sequence occupies a
whole power-of-two group (a 196K-token sequence takes 32 of 64 ranks at K ~ 8K) for its whole
micro-batch. This MILP keeps micro-batch and group counts integer:

Levels B_0 < B_1 < ... < B_L (B_0 = the least time of any sequence alone, which every
micro-batch lasts at least; B_{L+1} = inf). Any feasible step maps onto the model: a
micro-batch lasting T falls in the level l with B_l <= T < B_{l+1}; then
- n_l (integer) micro-batches in level l, summing T_l seconds: B_l n_l <= T_l <= B_{l+1} n_l;
- g_{l,d} (integer) groups of degree d in them: sum_d d g_{l,d} <= R n_l; sum_d g_{l,d} >= n_l;
- x_{q,l,d} >= 0 sequences of bucket q in those groups (each sequence once; the longest
  sequences are buckets of their own with 0/1 x), allowed only where
  const(d) + c_q(d) <= B_{l+1} (c_q(d): the bucket's least cost) and d >= the bucket's least
  minSP; y_{q,l,d} >= 0 the tokens of those sequences: s_min x <= y <= s_max x, and the y of a
  bucket sum to its actual tokens. Each member's seconds are priced from below by
  c_q(d) + k_{q,d} (s - s_min) (``_slopes``: the least secant slope over the bucket's actual
  members, so the line is below every member by construction), i.e. the bucket costs
  c_q(d) x + k_{q,d} (y - s_min x) at (l, d); without y (bucket minimum length and cost) the
  MILP often equalled the work bound on commoncrawl and github, with y it is 0.4-2% higher;
- time: sum_q (that cost) + const(d) g <= B_{l+1} g (every such group ends before B_{l+1});
- memory: sum_q y <= d K g; non-empty groups: sum_q x >= g;
- bin packing per group: sum_q f(size_q / capacity) x <= g for a few dual-feasible functions
  f (sum f <= 1 over any set of items that fits one bin), in memory (capacity d K) and in time
  (capacity B_{l+1} - const(d)): two sequences over half a group's tokens need two groups;
- rank-time: a micro-batch lasting T has every group within T, so R (T - b1) >= sum over its
  groups of d (time - b1): R T_l >= R b1 n_l + sum_d d ((const(d) - b1) g + sum_q c_q(d) x),
  and over the step R sum_l T_l >= R b1 sum_l n_l + sum d (const(d) - b1) g + W with W the
  exact least rank-seconds of all sequences;
- levels above the slowest sequence's own time (``ABOVE``) keep per-group time limits on the
  micro-batches that hold it;
- counts: sum_l n_l >= M_min, and sum_{l >= l'} n_l >= ceil(N_{l'} / (R K)) with N_{l'} the
  tokens of sequences whose least time is >= B_{l'}.
The objective sum_l T_l is then the plan's step time, so the MILP's optimum, and HiGHS's MIP
dual bound at any time limit, bound the true optimum from below. The returned bound is that
dual bound less a small tolerance margin (HiGHS's feasibility tolerances).
"""

from __future__ import annotations

import time

import highspy
import numpy as np

from seqpar.scatter.costmodel import CostModel, CostTable
from seqpar.scatter.highs import highs_model
from seqpar.scatter.partition import min_microbatches, seq_work


def _dff_half(u: float) -> float:
    """A dual-feasible function: at most one item above half a bin, two of exactly half."""
    return 1.0 if u > 0.5 + 1e-12 else (0.5 if u >= 0.5 - 1e-12 else 0.0)


def _dff_third(u: float) -> float:
    """A dual-feasible function: items above 2/3 count 1, in (1/3, 2/3] count 1/2 (at most two of
    those fit a bin, and one above 2/3 leaves room only for items <= 1/3)."""
    return 1.0 if u > 2 / 3 + 1e-12 else (0.5 if u > 1 / 3 + 1e-12 else 0.0)


def _dff_eps(eps: float):
    """f(u) = 1 above 1 - eps, u in [eps, 1 - eps], 0 below eps (eps <= 1/2): dual-feasible, since
    an item above 1 - eps shares its bin only with items below eps."""
    return lambda u: 1.0 if u > 1 - eps + 1e-12 else (u if u >= eps - 1e-12 else 0.0)


DFFS = (_dff_half, _dff_third) + tuple(_dff_eps(e) for e in (0.1, 0.2, 0.3, 0.4))


def _buckets(lengths: np.ndarray, tstar: np.ndarray, singles: int, ratio: float) -> list[list[int]]:
    """Sequence ids in buckets: the ``singles`` slowest alone, the rest by length (max/min <= ratio)."""
    order = sorted(range(len(lengths)), key=lambda i: -tstar[i])
    out = [[i] for i in order[:singles]]
    rest = sorted(order[singles:], key=lambda i: int(lengths[i]))
    cur: list[int] = []
    for i in rest:
        if cur and int(lengths[i]) > ratio * int(lengths[cur[0]]):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _slopes(tab: CostTable, ids: list[int], d: int) -> float:
    """The largest k with c_i(d) >= c_min(d) + k (s_i - s_min) / K for every member i of the
    bucket (seconds per K tokens; s_min, c_min: its least length and cost), i.e. the least
    secant slope from the shortest member: a linear lower bound on the members' seconds that
    holds by construction, whatever the shape of the cost model."""
    idx = np.asarray(ids)
    i0 = idx[np.argmin(tab.lengths[idx])]
    c = tab.best[d][idx]
    ok = (tab.lengths[idx] > tab.lengths[i0]) & np.isfinite(c)
    if not ok.any() or not np.isfinite(tab.best[d][i0]):
        return 0.0
    ds = (tab.lengths[idx][ok] - tab.lengths[i0]) / tab.cm.capacity
    return float(np.min((c[ok] - tab.best[d][i0]) / ds))


#: Level boundaries above the slowest sequence's own time, as multiples of it: a micro-batch
#: in the top level (unbounded above) has no per-group time limit in the model.
ABOVE = (1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0)


def _levels(tstar: np.ndarray, singles: list[int], grid: int) -> np.ndarray:
    """Level boundaries: the least time of any sequence, a geometric grid up to the largest
    single time, and every singleton's own time (a micro-batch holding it lasts at least that)."""
    lo, hi = float(tstar.min()), float(tstar.max())
    pts = [lo, hi] + [float(tstar[i]) for i in singles] + [hi * f for f in ABOVE]
    if hi > lo:
        pts += list(lo * (hi / lo) ** (np.arange(1, grid) / grid))
    # Boundaries a hair below each time, so that a sequence whose own time is a boundary is
    # never allowed in the level just below it by rounding (a lower boundary only weakens).
    pts = np.unique(np.asarray(pts) * (1 - 1e-9))
    keep = [pts[0]]
    for p in pts[1:]:
        if p > keep[-1] * (1 + 1e-9):
            keep.append(p)
    return np.asarray(keep)


def level_bound(cm: CostModel, lengths, allow_degree1: bool = True, time_limit_s: float | None = 4.0,
                singles: int = 12, ratio: float = 1.4, grid: int = 8, tokens: bool = True,
                mip_rel_gap: float = 1e-4, node_limit: int | None = None) -> tuple[float, dict]:
    """The level MILP's dual bound (seconds) and {"status", "mip_dual_bound", "mip_gap",
    "mip_rel_gap", "bound_s", "rows", "cols", "levels", "buckets"}; 0.0 when HiGHS gives no
    usable bound (e.g. its root LP did not finish).

    time_limit_s: HiGHS's wall-clock limit; None: none, so the bound depends only on the inputs
    (tests, reproducible reports); node_limit: HiGHS's branch-and-bound node limit (None: none;
    the dual bound is valid wherever HiGHS stops). mip_rel_gap: HiGHS stops once its primal and dual bounds are
    this close (relative), so two bounds from different models that HiGHS calls "Optimal" can
    differ by up to that much: compare them with ``info["mip_gap"]`` (the gap it reached) or
    solve to gap 0.

    singles: the slowest sequences kept as 0/1 variables; ratio: max/min length of the other
    buckets; grid: geometric levels between the least and the largest single-sequence time;
    tokens: False prices buckets at their least length and cost only (no y; weaker, faster).
    The defaults keep the model at ~4-8K columns and rows; at 512 sequences HiGHS needs ~2 s
    for the root LP and bounds within ~0.1% of its 10-s value by 4 s; finer models are
    tighter only with far more time (see the README notes)."""
    t0 = time.perf_counter()
    L = np.asarray(lengths, dtype=np.int64)
    tab = CostTable(cm, L)
    work = seq_work(tab, allow_degree1)
    w = np.array([x for x, _ in work])
    tstar = np.array([t for _, t in work])
    R, K = cm.world, cm.capacity
    degs = [d for d in tab.degrees if d >= (1 if allow_degree1 else 2)]
    buckets = _buckets(L, tstar, min(singles, len(L)), ratio)
    n_single = min(singles, len(L))
    B = _levels(tstar, [b[0] for b in buckets[:n_single]], grid)
    nl = len(B)
    upper = list(B[1:]) + [np.inf]
    const = {d: cm.group_const(d) for d in degs}

    lo_, hi_, kind, cost = [], [], [], []
    I, C = highspy.HighsVarType.kInteger, highspy.HighsVarType.kContinuous

    def var(lo, hi, k, c=0.0):
        lo_.append(lo)
        hi_.append(hi)
        kind.append(k)
        cost.append(c)
        return len(lo_) - 1

    n = [var(0.0, float(len(L)), I) for _ in range(nl)]
    T = [var(0.0, highspy.kHighsInf, C, 1.0) for _ in range(nl)]
    g = {(l, d): var(0.0, float(len(L)), I) for l in range(nl) for d in degs}
    bq = []  # per bucket: (count, s_q in units of K, {d: c_q(d)}, least minSP)
    for b in buckets:
        idx = np.asarray(b)
        bq.append((len(b), float(L[idx].min()) / K, {d: float(tab.best[d][idx].min()) for d in degs},
                   int(tab.min_degree[idx].min())))
    x: dict[tuple[int, int, int], int] = {}
    for q, (cnt, _, c, md) in enumerate(bq):
        for l in range(nl):
            for d in degs:
                if d >= md and const[d] + c[d] <= upper[l]:
                    x[q, l, d] = var(0.0, float(cnt), I if q < n_single else C)
    # Tokens of the multi-length buckets where they are placed (units of K), so memory counts
    # actual tokens, not count x least length, and time a secant line in them (``_slopes``).
    y = {key: var(0.0, highspy.kHighsInf, C) for key in x if tokens and len(set(L[buckets[key[0]]].tolist())) > 1}
    slope = {(q, d): _slopes(tab, buckets[q], d) for q in {key[0] for key in y} for d in degs}

    rows: list[tuple[dict[int, float], float, float]] = []
    inf = highspy.kHighsInf

    def add(row, lo, hi):
        rows.append((row, lo, hi))

    by_q: dict[int, list[int]] = {}
    by_ld: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (q, l, d), j in x.items():
        by_q.setdefault(q, []).append(j)
        by_ld.setdefault((l, d), []).append((q, j))
    for q, (cnt, _, _, _) in enumerate(bq):
        if q not in by_q:
            return 0.0, {"status": "no level fits a bucket", "bound_s": time.perf_counter() - t0}
        add({j: 1.0 for j in by_q[q]}, float(cnt), float(cnt))
    for q in sorted({key[0] for key in y}):
        idx = np.asarray(buckets[q])
        keys = [key for key in x if key[0] == q]
        add({y[key]: 1.0 for key in keys}, float(L[idx].sum()) / K, float(L[idx].sum()) / K)
        for key in keys:
            add({y[key]: 1.0, x[key]: -float(L[idx].min()) / K}, 0.0, inf)
            add({y[key]: 1.0, x[key]: -float(L[idx].max()) / K}, -inf, 0.0)

    def seconds(row: dict, q: int, l: int, d: int, scale: float = 1.0) -> None:
        """Add scale x (least seconds of bucket q's members at (l, d)) to row: c_q(d) per
        member, plus the secant slope times their tokens above the least length."""
        j, c = x[q, l, d], bq[q][2][d]
        if (q, l, d) in y:
            k = slope[q, d]
            row[j] = row.get(j, 0.0) + scale * (c - k * bq[q][1])
            row[y[q, l, d]] = row.get(y[q, l, d], 0.0) + scale * k
        else:
            row[j] = row.get(j, 0.0) + scale * c
    for l in range(nl):
        add({T[l]: 1.0, n[l]: -float(B[l])}, 0.0, inf)
        if np.isfinite(upper[l]):
            add({T[l]: 1.0, n[l]: -float(upper[l])}, -inf, 0.0)
        add({**{g[l, d]: float(d) for d in degs}, n[l]: -float(R)}, -inf, 0.0)
        add({**{g[l, d]: 1.0 for d in degs}, n[l]: -1.0}, 0.0, inf)
        rank_time = {T[l]: float(R), n[l]: -float(R) * cm.b1}
        for d in degs:
            members = by_ld.get((l, d), [])
            if np.isfinite(upper[l]):
                row = {}
                for q, _ in members:
                    seconds(row, q, l, d)
                row[g[l, d]] = const[d] - float(upper[l])
                add(row, -inf, 0.0)
            row = {y.get((q, l, d), j): (1.0 if (q, l, d) in y else bq[q][1]) for q, j in members}
            row[g[l, d]] = -float(d)
            add(row, -inf, 0.0)
            row = {j: 1.0 for _, j in members}
            row[g[l, d]] = -1.0
            add(row, 0.0, inf)
            # bin packing per group, in memory (capacity d K) and time (B_{l+1} - const(d)):
            # dual-feasible functions f with sum f(size / capacity) <= 1 per group
            caps = [(1, float(d))]
            if np.isfinite(upper[l]):
                caps.append((2, float(upper[l]) - const[d]))
            for f in DFFS:
                for col, capv in caps:
                    row = {}
                    for q, j in members:
                        size = bq[q][1] if col == 1 else bq[q][2][d]
                        v = f(size / capv) if capv > 0 else 0.0
                        if v > 0:
                            row[j] = v
                    if row:
                        row[g[l, d]] = -1.0
                        add(row, -inf, 0.0)
            rank_time[g[l, d]] = -float(d) * (const[d] - cm.b1)
            for q, _ in members:
                seconds(rank_time, q, l, d, -float(d))
        add(rank_time, 0.0, inf)
    row = {**{T[l]: float(R) for l in range(nl)}, **{n[l]: -float(R) * cm.b1 for l in range(nl)}}
    for (l, d), j in g.items():
        row[j] = -float(d) * (const[d] - cm.b1)
    add(row, float(w.sum()), inf)
    add({n[l]: 1.0 for l in range(nl)}, float(min_microbatches(cm, L)), inf)
    for lp in range(1, nl):
        tokens = int(L[tstar >= B[lp]].sum())
        if tokens:
            add({n[l]: 1.0 for l in range(lp, nl)}, float(-(-tokens // (R * K))), inf)

    left = None if time_limit_s is None else max(time_limit_s - (time.perf_counter() - t0), 0.05)
    gaps = {"mip_rel_gap": float(mip_rel_gap)}
    if mip_rel_gap == 0:
        gaps["mip_abs_gap"] = 0.0  # HiGHS's default absolute gap (1e-6) would stop it short of 0
    if node_limit is not None:
        gaps["mip_max_nodes"] = int(node_limit)
    h = highs_model(cost, lo_, hi_, rows, kind, left, **gaps)
    h.run()
    info = h.getInfo()
    status = h.modelStatusToString(h.getModelStatus())
    dual = float(info.mip_dual_bound)
    out = {"status": status, "mip_dual_bound": dual, "mip_gap": float(info.mip_gap), "mip_rel_gap": float(mip_rel_gap),
           "rows": len(rows), "cols": len(lo_), "levels": nl, "buckets": len(bq)}
    ok = status in ("Optimal", "Time limit reached", "Solution limit reached", "Interrupted by user",
                    "Node limit reached", "Iteration limit reached") and np.isfinite(dual)
    lb = max(0.0, dual * (1 - 1e-6) - 1e-9) if ok else 0.0
    out["bound_s"] = time.perf_counter() - t0
    return lb, out
