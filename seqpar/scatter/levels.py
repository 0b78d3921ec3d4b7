"""Micro-batches built as levels: first-fit decreasing by predicted time (pure, numpy).

    micro = level_microbatches(tab, work)              # [[(degree, [seq ids])]] per micro-batch
    micro = [complete_groups(tab, g) for g in micro]   # every rank busy (None where impossible)

The spec's chunking cuts the length-sorted batch into contiguous runs and only then assigns
groups, so a micro-batch's memory and idle rank-time are fixed before anyone looks at them. This
builder (ours, after first-fit-decreasing-height strip packing) decides both together, one
micro-batch at a time:

1. the longest unplaced sequence opens the micro-batch at the degree where it costs the fewest
   rank-seconds; the micro-batch's target makespan T is its time, or more when the work left
   needs it: ``average`` x (b1 + remaining least work / (R x the micro-batches the remaining
   tokens need at least)), which keeps the short tail in a few full micro-batches instead of
   one short micro-batch per opener (``fast_openers``: the opener instead takes the cheapest
   degree that finishes by that target, else the fastest, so a long sequence on its cheapest
   degree does not set a makespan far above the target and idle the ranks beside it); with
   ``lead`` = k, T is also at least the own time of each of the next k longest sequences at
   their cheapest degree, so that they can join at that degree rather than on more ranks,
   where cross-node communication makes them dearer (GPT-7B on A100-40GB: a 125K-token
   sequence costs 105 rank-seconds on 16 ranks, 140 on 32);
2. every other unplaced sequence, longest first, joins an open group where it still finishes by
   T within the group's d x K tokens (the one it leaves the least time in: best fit), or else
   opens a group on the free ranks at the cheapest degree (rank-seconds) that finishes by T;
3. the micro-batch closes when the list is exhausted; ``complete_groups`` then hands free ranks
   to the groups (the greedy's growth step) or re-plans the micro-batch with the greedy,
   whichever is faster.

Long sequences thus set the makespans and short ones fill the time and memory left next to
them, so micro-batches come out full in both and the count stays near ceil(tokens / (R K)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqpar.scatter.costmodel import CostTable
from seqpar.scatter.greedy import Grouping, evaluate_groups, greedy_groups, grow, improve
from seqpar.scatter.plan import PlanError


@dataclass(frozen=True)
class LevelBuild:
    """The rules of one level build (see the module doc): target-makespan factor ``average``,
    ``fast_openers`` (the opener takes the cheapest degree meeting the target, not the cheapest
    overall) and ``lead`` (the target covers the next ``lead`` sequences at their cheapest degree)."""

    average: float = 1.0
    fast_openers: bool = False
    lead: int = 0


def _open_degree(tab: CostTable, i: int, free: int, limit: float, lo: int) -> int | None:
    """Cheapest degree (rank-seconds) for sequence i alone in a new group of at most ``free``
    ranks that finishes by ``limit`` seconds; None if there is none."""
    best, best_w = None, np.inf
    for d in tab.degrees:
        if d < lo or d > free or d < tab.min_degree[i]:
            continue
        c = float(tab.best[d][i])
        if tab.cm.group_const(d) + c <= limit and d * c < best_w - 1e-15:
            best, best_w = d, d * c
    return best


def _fast_degree(tab: CostTable, i: int, free: int, target: float, lo: int) -> int:
    """Opener degree of a ``fast_openers`` build: the cheapest (rank-seconds) that finishes
    sequence i by ``target``, or else the fastest one, so that the opener does not set a
    makespan above the target when more ranks can avoid it."""
    d = _open_degree(tab, i, free, target, lo)
    if d is not None:
        return d
    ok = [d for d in tab.degrees if lo <= d <= free and d >= tab.min_degree[i]]
    return min(ok, key=lambda d: tab.cm.group_const(d) + float(tab.best[d][i]))


def level_microbatches(tab: CostTable, work: np.ndarray, average: float = 1.0,
                       allow_degree1: bool = True, fast_openers: bool = False, lead: int = 0) -> list[Grouping]:
    """Micro-batches of the whole batch built as levels (see the module doc).

    work: float64 [n] each sequence's least rank-seconds (``partition.seq_work``).

    Returns one list of (degree, [seq ids]) per micro-batch; degrees are powers of two summing
    to at most R (free ranks are left for the caller to grow into). Every sequence appears once.
    """
    cm, L = tab.cm, tab.lengths
    R, K = cm.world, cm.capacity
    lo = 1 if allow_degree1 else 2
    # Least seconds each sequence can add to any group: with no free ranks left, a sequence
    # whose length exceeds every group's memory room, or whose least cost exceeds every
    # group's time room, is skipped without pricing it against each group.
    cmin = np.min(np.stack([tab.best[d] for d in tab.degrees]), axis=0)
    todo = sorted(range(len(L)), key=lambda i: -int(L[i]))
    out: list[Grouping] = []
    while todo:
        first = todo[0]
        d0 = _open_degree(tab, first, cm.max_degree, np.inf, lo)
        if d0 is None:  # only without degree 1 on a one-rank world
            raise PlanError(f"sequence {first} ({int(L[first])} tokens) fits no group of {lo} to "
                            f"{cm.max_degree} ranks; allow degree 1 or add ranks")
        m_rest = max(1, -(-int(L[todo].sum()) // (R * K)))
        mean = cm.b1 + float(work[todo].sum()) / (R * m_rest)
        if fast_openers:
            d0 = _fast_degree(tab, first, cm.max_degree, average * mean, lo)
        limit = max(cm.group_const(d0) + float(tab.best[d0][first]), average * mean)
        for j in todo[1:1 + lead]:
            dj = _open_degree(tab, j, cm.max_degree, np.inf, lo)
            if dj is not None:
                limit = max(limit, cm.group_const(dj) + float(tab.best[dj][j]))
        degs: list[int] = []
        gi = np.zeros(0, dtype=np.int64)
        ids: list[list[int]] = []
        sums = np.zeros((0, tab.all.shape[2]))  # [G, A] seconds per algorithm
        tokens = np.zeros(0, dtype=np.int64)
        cap = np.zeros(0, dtype=np.int64)
        free = R
        room_max, time_max = 0, 0.0  # most tokens / seconds any open group can still take
        rest = []
        for n_seen, i in enumerate(todo):
            s = int(L[i])
            if free == 0 and (room_max < int(L[todo[-1]]) or time_max <= 0.0):
                rest.extend(todo[n_seen:])  # every group is full in memory or time
                break
            if free == 0 and (s > room_max or cmin[i] > time_max):
                rest.append(i)
                continue
            g = -1
            if degs:
                new_t = (sums + tab.all[i, gi, :]).min(axis=1)
                slack = np.where((tokens + s <= cap) & (new_t <= limit), limit - new_t, np.inf)
                g = int(np.argmin(slack))
                if not np.isfinite(slack[g]):
                    g = -1
            if g < 0 and free > 0:
                d = d0 if not degs else _open_degree(tab, i, free, limit, lo)
                if d is not None:
                    degs.append(d)
                    ids.append([])
                    gi = np.append(gi, tab.deg_index[d])
                    sums = np.vstack([sums, np.full((1, sums.shape[1]), cm.group_const(d))])
                    tokens = np.append(tokens, 0)
                    cap = np.append(cap, d * K)
                    free -= d
                    g = len(degs) - 1
            if g < 0:
                rest.append(i)
                continue
            sums[g] += tab.all[i, gi[g], :]
            tokens[g] += s
            ids[g].append(i)
            room_max = int((cap - tokens).max())
            time_max = float((limit - sums.min(axis=1)).max())
        out.append(list(zip(degs, ids)))
        todo = rest
    return out


def complete_groups(tab: CostTable, groups: Grouping, allow_degree1: bool = True, all_busy: bool = True) -> Grouping | None:
    """Finish a level micro-batch: its own groups grown onto the free ranks, or the greedy's
    groups for the same sequences, whichever has the smaller makespan (both locally improved);
    None when neither occupies every rank while ``all_busy`` asks for it."""
    lo = 1 if allow_degree1 else 2
    rows = [[d, list(ids), tab.tokens(ids)] for d, ids in groups]
    used = grow(tab, rows, sum(d for d, _, _ in rows), lo)
    options = []
    if used == tab.cm.world or not all_busy:
        options.append(improve(tab, [(d, ids) for d, ids, _ in rows]))
    fresh = greedy_groups(tab, [i for _, ids in groups for i in ids], allow_degree1, all_busy)
    if fresh is not None:
        options.append(fresh)
    return min(options, key=lambda g: evaluate_groups(tab, g)[0]) if options else None
