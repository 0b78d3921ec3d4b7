"""Greedy group assignment of one micro-batch, and the group evaluator (pure).

    groups = greedy_groups(cm, lengths, ids)       # [(degree, [seq ids])] or None if it cannot fit
    t, algos = evaluate_groups(cm, lengths, groups)

Greedy (the spec's baseline and the MILP's warm start): sort by length, give each sequence its
minimum group (minSP), best-fit pack sequences into open groups of that degree, then grow the
slowest groups with the spare ranks, and finally move single sequences off the slowest group
while that lowers the makespan.
"""

from __future__ import annotations

from seqpar.scatter.costmodel import CostModel

Groups = list[tuple[int, list[int]]]


def group_best(cm: CostModel, lengths, d: int, ids) -> tuple[float, str]:
    """(seconds, algorithm) of the best algorithm for a group of degree d holding ``ids``."""
    seqs = [int(lengths[i]) for i in ids]
    return min((cm.group_time(seqs, d, a), a) for a in cm.algorithms(d))


def evaluate_groups(cm: CostModel, lengths, groups: Groups) -> tuple[float, list[str]]:
    """Micro-batch makespan (seconds) and the algorithm of each group."""
    res = [group_best(cm, lengths, d, ids) for d, ids in groups]
    return max((t for t, _ in res), default=0.0), [a for _, a in res]


def _fits(cm: CostModel, lengths, d: int, ids, extra: int = 0) -> bool:
    return sum(int(lengths[i]) for i in ids) + extra <= d * cm.capacity


def greedy_groups(cm: CostModel, lengths, ids: list[int], allow_degree1: bool = True,
                  all_busy: bool = True) -> Groups | None:
    """Greedy groups for the sequences ``ids`` on cm.world ranks; None when they do not fit."""
    R = cm.world
    lo = 1 if allow_degree1 else 2
    order = sorted(ids, key=lambda i: -int(lengths[i]))
    groups: list[list] = []  # [degree, ids, tokens]
    used = 0
    for i in order:
        s = int(lengths[i])
        d0 = max(cm.min_degree(s), lo)
        if d0 > cm.max_degree:
            return None
        same = [g for g in groups if g[0] == d0 and g[2] + s <= d0 * cm.capacity]
        if used + d0 <= R and not same:
            groups.append([d0, [i], s])
            used += d0
            continue
        if same:  # best fit: the fullest group that still holds it
            g = max(same, key=lambda g: g[2])
        else:
            cands = [g for g in groups if g[0] >= d0 and g[2] + s <= g[0] * cm.capacity]
            if not cands:
                return None
            g = min(cands, key=lambda g: group_best(cm, lengths, g[0], g[1] + [i])[0])
        g[1].append(i)
        g[2] += s
    # Grow: double the slowest group that the spare ranks allow.
    while used < R:
        grow = [g for g in groups if g[0] <= R - used and 2 * g[0] <= cm.max_degree]
        if grow:
            g = max(grow, key=lambda g: group_best(cm, lengths, g[0], g[1])[0])
            used += g[0]
            g[0] *= 2
            continue
        # No group can double (non-power-of-two world): open a group of the largest spare
        # power of two and move into it one sequence that fits there.
        p = 1 << ((R - used).bit_length() - 1)
        if p < lo:
            break
        moved = False
        for g in sorted(groups, key=lambda g: -group_best(cm, lengths, g[0], g[1])[0]):
            if len(g[1]) < 2:
                continue
            for i in sorted(g[1], key=lambda i: int(lengths[i])):
                if int(lengths[i]) <= p * cm.capacity:
                    g[1].remove(i)
                    g[2] -= int(lengths[i])
                    groups.append([p, [i], int(lengths[i])])
                    used += p
                    moved = True
                    break
            if moved:
                break
        if not moved:
            break
    if all_busy and used != R:
        return None
    out = [(g[0], list(g[1])) for g in groups]
    return improve(cm, lengths, out)


class _Costs:
    """Memoised per-sequence costs {algorithm: seconds} by (length, degree)."""

    def __init__(self, cm: CostModel) -> None:
        self.cm = cm
        self.memo: dict[tuple[int, int], dict[str, float]] = {}

    def __call__(self, s: int, d: int) -> dict[str, float]:
        key = (s, d)
        got = self.memo.get(key)
        if got is None:
            got = self.memo[key] = {a: self.cm.seq_cost(s, d, a) for a in self.cm.algorithms(d)}
        return got


def improve(cm: CostModel, lengths, groups: Groups, rounds: int = 300) -> Groups:
    """Local search: move one sequence off the slowest group while the makespan falls."""
    costs = _Costs(cm)
    groups = [(d, list(ids)) for d, ids in groups]
    sums = []  # per group: {algorithm: summed seconds}
    tokens = []
    for d, ids in groups:
        acc = {a: cm.group_const(d) for a in cm.algorithms(d)}
        for i in ids:
            for a, c in costs(int(lengths[i]), d).items():
                acc[a] += c
        sums.append(acc)
        tokens.append(sum(int(lengths[i]) for i in ids))
    times = [min(acc.values()) for acc in sums]
    for _ in range(rounds):
        a = max(range(len(groups)), key=lambda k: times[k])
        da, ia = groups[a]
        if len(ia) < 2:
            break
        best = None
        for i in ia:
            s = int(lengths[i])
            ca = costs(s, da)
            ta = min(v - ca[al] for al, v in sums[a].items())
            for b, (db, ib) in enumerate(groups):
                if b == a or tokens[b] + s > db * cm.capacity:
                    continue
                cb = costs(s, db)
                tb = min(v + cb[al] for al, v in sums[b].items())
                pair = max(ta, tb)
                if pair < times[a] - 1e-12 and (best is None or pair < best[0]):
                    best = (pair, i, b)
        if best is None:
            break
        _, i, b = best
        s = int(lengths[i])
        ia.remove(i)
        groups[b][1].append(i)
        for k, sign in ((a, -1.0), (b, 1.0)):
            for al, c in costs(s, groups[k][0]).items():
                sums[k][al] += sign * c
            tokens[k] += int(sign) * s
            times[k] = min(sums[k].values())
    return groups
