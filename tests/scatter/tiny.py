"""A tiny hand-made cost model and a brute-force optimum for checking the planner and bound."""

from __future__ import annotations

import itertools

from seqpar.scatter.costmodel import CostModel


def tiny_cost_model(world: int = 4, capacity: int = 100, gpus_per_node: int = 2) -> CostModel:
    """4 layers, 4 heads x 8 dims (2 KV heads); constants chosen so that every term matters."""
    return CostModel(world=world, a1=2e-5, a2=1e-3, b1=0.05, b2=0.01, capacity=capacity, gpus_per_node=gpus_per_node,
                     alltoall_bw={2: 2e6, 4: 5e5}, p2p_intra_bw=4e6, p2p_inter_bw=1e6, n_layers=4, n_heads=4,
                     n_kv_heads=2, head_dim=8)


def _set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def _layouts(world: int, all_busy: bool):
    degs = [d for d in (1, 2, 4, 8, 16) if d <= world]
    for r in range(1, world + 1):
        for combo in itertools.combinations_with_replacement(degs, r):
            total = sum(combo)
            if total == world or (not all_busy and total < world):
                yield sorted(combo, reverse=True)


def _microbatch_opt(cm: CostModel, lengths, ids: list[int], all_busy: bool) -> float:
    best = float("inf")
    for layout in _layouts(cm.world, all_busy):
        if len(layout) > len(ids):
            continue
        for assign in itertools.product(range(len(layout)), repeat=len(ids)):
            members = [[ids[k] for k in range(len(ids)) if assign[k] == g] for g in range(len(layout))]
            if any(not m for m in members):
                continue
            t = 0.0
            for d, m in zip(layout, members):
                seqs = [int(lengths[i]) for i in m]
                if sum(seqs) > d * cm.capacity:
                    t = float("inf")
                    break
                t = max(t, min(cm.group_time(seqs, d, a) for a in cm.algorithms(d)))
            best = min(best, t)
    return best


def brute_force(cm: CostModel, lengths, all_busy: bool = True) -> float:
    """Exact optimum over every micro-batch split, group layout, assignment and algorithm."""
    best = float("inf")
    memo: dict[tuple, float] = {}
    for part in _set_partitions(list(range(len(lengths)))):
        total = 0.0
        for mb in part:
            key = tuple(sorted(mb))
            if key not in memo:
                memo[key] = _microbatch_opt(cm, lengths, list(key), all_busy)
            total += memo[key]
        best = min(best, total)
    return best


def random_instances(seed: int, spec=((4, 10, 5), (3, 10, 5), (2, 10, 6))):
    """(cost model, lengths) pairs for brute-force checks: per (world, cases, max sequences) in spec,
    that many random batches whose sequences each fit the cluster."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for world, cases, n_max in spec:
        cm = tiny_cost_model(world=world)
        for _ in range(cases):
            n = int(rng.integers(1, n_max + 1))
            yield cm, [int(x) for x in rng.integers(1, cm.max_degree * cm.capacity + 1, size=n)]
