"""Greedy group assignment of one micro-batch, and the group evaluator (pure).

    tab = CostTable(cm, lengths)
    groups = greedy_groups(tab, ids)        # [(degree, [seq ids])] or None if they cannot fit
    t, algos = evaluate_groups(tab, groups)

Greedy (the spec's baseline and the MILP's warm start) is the better of two constructions, each
followed by a local search that moves single sequences off the slowest group:
- bottom-up (the spec's): sort by length, give each sequence its minimum group (minSP),
  best-fit pack sequences into open groups of that degree, then grow the slowest groups with
  the spare ranks;
- top-down (ours): start from the largest aligned groups holding everything, then halve the
  slowest group while that lowers its time. It always fits when the micro-batch has at most
  R x K tokens, where minSP rounding can leave bottom-up without ranks.
"""

from __future__ import annotations

import numpy as np

from seqpar.scatter.costmodel import CostTable

#: One micro-batch's SP groups as (degree, sequence ids); ``plan.lay_out`` places them on ranks.
Grouping = list[tuple[int, list[int]]]


def evaluate_groups(tab: CostTable, groups: Grouping) -> tuple[float, list[str]]:
    """Micro-batch makespan (seconds) and the algorithm of each group."""
    res = [tab.group(d, ids) for d, ids in groups]
    return max((t for t, _ in res), default=0.0), [a for _, a in res]


def greedy_groups(tab: CostTable, ids: list[int], allow_degree1: bool = True, all_busy: bool = True) -> Grouping | None:
    """Greedy groups for the sequences ``ids`` on cm.world ranks; None when they do not fit."""
    best, best_t = None, float("inf")
    for make in (pack_groups, split_groups):
        got = make(tab, ids, allow_degree1, all_busy)
        if got is not None:
            got = improve(tab, got)
            t = evaluate_groups(tab, got)[0]
            if t < best_t:
                best, best_t = got, t
    return best


def pack_groups(tab: CostTable, ids: list[int], allow_degree1: bool = True, all_busy: bool = True) -> Grouping | None:
    """Bottom-up: minSP groups, best-fit packing, then grow the slowest groups with spare ranks."""
    cm, L = tab.cm, tab.lengths
    R, K = cm.world, cm.capacity
    lo = 1 if allow_degree1 else 2
    groups: list[list] = []  # [degree, ids, tokens]
    used = 0
    for i in sorted(ids, key=lambda i: -int(L[i])):
        s = int(L[i])
        d0 = max(int(tab.min_degree[i]), lo)
        if d0 > cm.max_degree:
            return None
        same = [g for g in groups if g[0] == d0 and g[2] + s <= d0 * K]
        if used + d0 <= R and not same:
            groups.append([d0, [i], s])
            used += d0
            continue
        if same:  # best fit: the fullest group that still holds it
            g = max(same, key=lambda g: g[2])
        else:
            cands = [g for g in groups if g[0] >= d0 and g[2] + s <= g[0] * K]
            if not cands:
                return None
            g = min(cands, key=lambda g: tab.group(g[0], g[1] + [i])[0])
        g[1].append(i)
        g[2] += s
    used = grow(tab, groups, used, lo)
    if all_busy and used != R:
        return None
    return [(g[0], list(g[1])) for g in groups]


def grow(tab: CostTable, groups: list[list], used: int, lo: int = 1) -> int:
    """Hand the free ranks (R - used) to the groups [degree, ids, tokens], in place: double the
    slowest group the free ranks allow; when none can double (R not a power of two), a new
    group of the largest free power of two takes the shortest sequence of the slowest group
    holding two or more. Returns the ranks used afterwards (R unless nothing could move)."""
    cm, L = tab.cm, tab.lengths
    R, K = cm.world, cm.capacity
    while used < R:  # double the slowest group that the free ranks allow
        cands = [g for g in groups if g[0] <= R - used and 2 * g[0] <= cm.max_degree]
        if cands:
            g = max(cands, key=lambda g: tab.group(g[0], g[1])[0])
            used += g[0]
            g[0] *= 2
            continue
        # Nothing can double (R not a power of two): a new group of the largest spare power of
        # two takes the shortest sequence of the slowest group that has two or more.
        p = 1 << ((R - used).bit_length() - 1)
        donors = [g for g in sorted(groups, key=lambda g: -tab.group(g[0], g[1])[0]) if len(g[1]) > 1]
        i = next((min(g[1], key=lambda i: int(L[i])) for g in donors if p >= lo
                  and int(L[min(g[1], key=lambda i: int(L[i]))]) <= p * K), None)
        if i is None:
            break
        g = next(g for g in donors if i in g[1])
        g[1].remove(i)
        g[2] -= int(L[i])
        groups.append([p, [i], int(L[i])])
        used += p
    return used


def _halve(tab: CostTable, d: int, ids: list[int]) -> tuple[list[int], list[int]] | None:
    """Split a group's sequences into two groups of degree d/2: longest first to the half with
    less predicted time (then, if that overflows, to the half with more room)."""
    L, h = tab.lengths, d // 2
    cap = h * tab.cm.capacity
    best_h = tab.best[h]
    order = sorted(ids, key=lambda i: -int(L[i]))
    for by_time in (True, False):
        halves: list[list[int]] = [[], []]
        load, tokens = [0.0, 0.0], [0, 0]
        for i in order:
            s = int(L[i])
            key = load if by_time else tokens
            k = next((k for k in sorted((0, 1), key=lambda k: key[k]) if tokens[k] + s <= cap), None)
            if k is None:
                break
            halves[k].append(i)
            load[k] += float(best_h[i])
            tokens[k] += s
        else:
            if halves[0] and halves[1]:
                return halves[0], halves[1]
    return None


def split_groups(tab: CostTable, ids: list[int], allow_degree1: bool = True, all_busy: bool = True) -> Grouping | None:
    """Top-down: the binary digits of R as groups (sequences longest first to the group with most
    room), then halve the slowest group while that lowers its time."""
    cm, L = tab.cm, tab.lengths
    lo = 1 if allow_degree1 else 2
    degs = [1 << b for b in range(cm.world.bit_length() - 1, -1, -1) if cm.world >> b & 1 and 1 << b >= lo]
    groups: list[tuple[int, list[int]]] = [(d, []) for d in degs]
    tokens = [0] * len(groups)
    for i in sorted(ids, key=lambda i: -int(L[i])):
        s = int(L[i])
        k = max(range(len(groups)), key=lambda k: groups[k][0] * cm.capacity - tokens[k])
        if tokens[k] + s > groups[k][0] * cm.capacity:
            return None
        groups[k][1].append(i)
        tokens[k] += s
    if any(not g for _, g in groups):
        if all_busy:
            return None
        groups = [g for g in groups if g[1]]
    times = [tab.group(d, g)[0] for d, g in groups]
    stuck: set[int] = set()
    while True:
        todo = [k for k in range(len(groups)) if k not in stuck and groups[k][0] // 2 >= lo]
        if not todo:
            break
        k = max(todo, key=lambda k: times[k])
        d, g = groups[k]
        halves = _halve(tab, d, g)
        new_t = [tab.group(d // 2, x)[0] for x in halves] if halves else []
        if not halves or max(new_t) >= times[k]:
            stuck.add(k)
            continue
        groups[k] = (d // 2, halves[0])
        groups.append((d // 2, halves[1]))
        times[k] = new_t[0]
        times.append(new_t[1])
    return groups


def improve(tab: CostTable, groups: Grouping, rounds: int = 300, max_swaps: int = 16) -> Grouping:
    """Local search on the slowest group while the makespan falls: move one of its sequences to
    another group, or else exchange one with a sequence of another group."""
    cm, L = tab.cm, tab.lengths
    groups = [(d, list(ids)) for d, ids in groups]
    if len(groups) < 2:
        return groups
    gi = np.array([tab.deg_index[d] for d, _ in groups])
    const = np.array([cm.group_const(d) for d, _ in groups])
    sums = np.stack([const[k] + tab.all[ids, gi[k], :].sum(axis=0) for k, (_, ids) in enumerate(groups)])  # [G, A]
    cap = np.array([d * cm.capacity for d, _ in groups], dtype=np.int64)
    tokens = np.array([tab.tokens(ids) for _, ids in groups], dtype=np.int64)
    times = sums.min(axis=1)
    swaps = 0
    for _ in range(rounds):
        a = int(np.argmax(times))
        ia = groups[a][1]
        if len(ia) < 2:
            break
        best = None
        for i in ia:
            ta = float(np.min(sums[a] - tab.all[i, gi[a]]))
            if ta >= times[a] - 1e-12:
                continue
            tb = np.min(sums + tab.all[i, gi, :], axis=1)
            tb[a] = np.inf
            tb[tokens + L[i] > cap] = np.inf
            b = int(np.argmin(tb))
            pair = max(ta, float(tb[b]))
            if pair < times[a] - 1e-12 and (best is None or pair < best[0]):
                best = (pair, i, b)
        if best is not None:
            _, i, b = best
            ia.remove(i)
            groups[b][1].append(i)
            sums[a] -= tab.all[i, gi[a]]
            sums[b] += tab.all[i, gi[b]]
            tokens[a] -= L[i]
            tokens[b] += L[i]
            times[a], times[b] = sums[a].min(), sums[b].min()
            continue
        swap = _best_swap(tab, groups, a, gi, sums, tokens, cap, times) if swaps < max_swaps else None
        if swap is None:
            break
        swaps += 1
        i, j, b = swap
        ia[ia.index(i)] = j
        ib = groups[b][1]
        ib[ib.index(j)] = i
        sums[a] += tab.all[j, gi[a]] - tab.all[i, gi[a]]
        sums[b] += tab.all[i, gi[b]] - tab.all[j, gi[b]]
        tokens[a] += L[j] - L[i]
        tokens[b] += L[i] - L[j]
        times[a], times[b] = sums[a].min(), sums[b].min()
    return groups


def _best_swap(tab: CostTable, groups: Grouping, a: int, gi, sums, tokens, cap, times) -> tuple[int, int, int] | None:
    """The exchange of a sequence of the slowest group a with one of another group that most
    lowers the pair's makespan (memory permitting); None when no exchange helps."""
    L = tab.lengths
    others = np.array([j for b, (_, ids) in enumerate(groups) if b != a for j in ids], dtype=np.int64)
    if others.size == 0:
        return None
    owner = np.array([b for b, (_, ids) in enumerate(groups) if b != a for _ in ids], dtype=np.int64)
    gb = gi[owner]
    best = None
    for i in sorted(groups[a][1], key=lambda i: -int(L[i]))[:8]:  # its 8 longest: bounded work
        d_tok = L[others] - L[i]  # tokens group a gains (group b loses)
        ok = (tokens[a] + d_tok <= cap[a]) & (tokens[owner] - d_tok <= cap[owner])
        if not ok.any():
            continue
        ta = np.min(sums[a][None, :] - tab.all[i, gi[a]][None, :] + tab.all[others, gi[a], :], axis=1)
        tb = np.min(sums[owner] - tab.all[others, gb, :] + tab.all[i, gb, :], axis=1)
        pair = np.where(ok, np.maximum(ta, tb), np.inf)
        k = int(np.argmin(pair))
        if pair[k] < times[a] - 1e-12 and (best is None or pair[k] < best[0]):
            best = (float(pair[k]), int(i), int(others[k]), int(owner[k]))
    return None if best is None else best[1:]
