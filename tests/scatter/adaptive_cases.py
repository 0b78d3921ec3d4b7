"""Adaptive training runs inside pool workers: forced plans of chosen shapes (functions sent to a DistPool)."""

from __future__ import annotations

import numpy as np

from seqpar.config import load_config
from seqpar.scatter.plan import GroupPlan, MicroBatchPlan, Plan

#: Plan templates per world size: per step, micro-batches of groups (degree, algorithm, ulysses),
#: laid on consecutive ranks in this (decreasing-degree) order; a micro-batch that covers fewer
#: ranks than the world leaves the rest idle (they run an empty pass). Steps cycle through them.
TEMPLATES: dict[int, list[list[list[tuple[int, str, int]]]]] = {
    4: [
        [[(2, "ring", 1), (1, "local", 1), (1, "local", 1)], [(4, "ulysses", 4)]],
        [[(4, "hybrid", 2)], [(2, "ulysses", 2), (2, "ring", 1)]],
        [[(2, "ring", 1), (1, "local", 1)], [(4, "ring", 1)]],  # rank 3 idles in micro-batch 0
    ],
    8: [
        [[(4, "ring", 1), (2, "ulysses", 2), (1, "local", 1), (1, "local", 1)], [(8, "hybrid", 2)]],
        [[(8, "ulysses", 4 * 2)], [(4, "hybrid", 2), (4, "ulysses", 4)]],
        [[(4, "ulysses", 4), (2, "ring", 1)], [(8, "ring", 1)]],  # ranks 6, 7 idle in micro-batch 0
    ],
}


def forced_plan(world: int, step: int, lengths: np.ndarray) -> Plan:
    """The template of ``step`` with the step's sequences dealt over its groups, longest first, each
    to the group with the fewest tokens per rank (every group gets at least one)."""
    template = TEMPLATES[world][step % len(TEMPLATES[world])]
    groups = [(m, j) for m, mb in enumerate(template) for j in range(len(mb))]
    if len(lengths) < len(groups):
        raise ValueError(f"step {step} has {len(lengths)} sequences, fewer than the template's {len(groups)} groups")
    order = [int(i) for i in np.argsort(-np.asarray(lengths), kind="stable")]
    ids: dict[tuple[int, int], list[int]] = {g: [order[k]] for k, g in enumerate(groups)}
    load = {g: int(lengths[order[k]]) / template[g[0]][g[1]][0] for k, g in enumerate(groups)}
    for i in order[len(groups):]:
        g = min(groups, key=lambda g: load[g])
        ids[g].append(i)
        load[g] += int(lengths[i]) / template[g[0]][g[1]][0]
    mbs = []
    for m, mb in enumerate(template):
        at, out = 0, []
        for j, (d, algo, u) in enumerate(mb):
            out.append(GroupPlan(d, algo, at, tuple(sorted(ids[(m, j)])), u, d // u))
            at += d
        mbs.append(MicroBatchPlan(tuple(out)))
    return Plan(world=world, micro_batches=mbs, predicted_step_s=0.0)


def train_adaptive(overrides: list[str], world: int) -> list[dict]:
    """Train with forced plans (every rank); returns the step records."""
    from seqpar.scatter.plan_source import ForcedPlans
    from seqpar.train.trainer import Trainer

    class ForcedTrainer(Trainer):
        def build_plan_source(self):
            return ForcedPlans(lambda step, lengths: forced_plan(world, step, lengths))

    return ForcedTrainer(load_config(None, overrides)).train()


def train_plain(overrides: list[str]) -> list[dict]:
    from seqpar.train.trainer import train

    return train(load_config(None, overrides))
