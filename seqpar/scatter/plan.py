"""The step plan: versioned, serialisable, validated on every rank (pure).

    plan = Plan(world=8, micro_batches=[MicroBatchPlan([GroupPlan(8, "ulysses", 0, (3, 1))])])
    text = plan.to_json()                      # rank 0 broadcasts this string
    Plan.from_json(text).validate(lengths, capacity)   # every rank checks before running it

A plan lists micro-batches; each partitions the ranks into groups laid on consecutive ranks in
decreasing degree, so every group starts at a multiple of its degree (aligned) and is one of the
pool's pre-built groups. A group holds whole sequences (ids into the step's batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan is malformed or infeasible; the message names the micro-batch and group."""


@dataclass(frozen=True)
class GroupPlan:
    """One SP group of one micro-batch.

    degree: ranks (power of two); algorithm: local | ulysses | ring | hybrid; first_rank: its
    first global rank (a multiple of degree); seq_ids: the batch's sequences it runs;
    ulysses, ring: inner all-to-all and outer ring degrees (ulysses * ring == degree).
    """

    degree: int
    algorithm: str
    first_rank: int
    seq_ids: tuple[int, ...]
    ulysses: int = 0
    ring: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seq_ids", tuple(int(i) for i in self.seq_ids))
        if self.ulysses == 0 and self.ring == 0:
            u = self.degree if self.algorithm in ("ulysses", "local") else 1
            object.__setattr__(self, "ulysses", u)
            object.__setattr__(self, "ring", self.degree // u)

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.degree)


@dataclass(frozen=True)
class MicroBatchPlan:
    groups: tuple[GroupPlan, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))


@dataclass
class Plan:
    """Micro-batches of one step on ``world`` ranks, with the planner's predictions (seconds)."""

    world: int
    micro_batches: list[MicroBatchPlan]
    predicted_step_s: float = 0.0
    micro_batch_s: list[float] = field(default_factory=list)
    version: int = PLAN_VERSION

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "world": self.world,
            "predicted_step_s": self.predicted_step_s,
            "micro_batch_s": list(self.micro_batch_s),
            "micro_batches": [
                [{"degree": g.degree, "algorithm": g.algorithm, "first_rank": g.first_rank, "ulysses": g.ulysses,
                  "ring": g.ring, "seq_ids": list(g.seq_ids)} for g in mb.groups]
                for mb in self.micro_batches
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"plan version {version!r} is not supported (this code reads version {PLAN_VERSION}); "
                            "re-plan with the same seqpar version on every rank")
        mbs = [MicroBatchPlan(tuple(GroupPlan(**g) for g in mb)) for mb in data["micro_batches"]]
        return cls(world=int(data["world"]), micro_batches=mbs, predicted_step_s=float(data.get("predicted_step_s", 0.0)),
                   micro_batch_s=[float(x) for x in data.get("micro_batch_s", [])], version=version)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_microbatches(self) -> int:
        return len(self.micro_batches)

    def groups_of_rank(self, rank: int) -> list[GroupPlan | None]:
        """Per micro-batch, the group this rank belongs to (None when it idles)."""
        out: list[GroupPlan | None] = []
        for mb in self.micro_batches:
            out.append(next((g for g in mb.groups if rank in g.ranks), None))
        return out

    def max_tokens_per_rank(self, lengths) -> float:
        return max((sum(lengths[i] for i in g.seq_ids) / g.degree for mb in self.micro_batches for g in mb.groups),
                   default=0.0)

    # -- validation --------------------------------------------------------------------------
    def validate(self, lengths, capacity: int, all_busy: bool = True) -> None:
        """Raise PlanError unless: every sequence exactly once, tokens/rank <= capacity, groups
        aligned power-of-two blocks in decreasing degree that exactly cover the ranks (or a
        prefix of them when ``all_busy`` is False), no empty group, ulysses * ring == degree."""
        n = len(lengths)
        seen = [0] * n
        for m, mb in enumerate(self.micro_batches):
            at = 0
            prev = None
            if not mb.groups:
                raise PlanError(f"micro-batch {m} has no groups; drop it or give it sequences")
            for j, g in enumerate(mb.groups):
                where = f"micro-batch {m} group {j} (degree {g.degree}, first rank {g.first_rank})"
                if g.degree < 1 or g.degree & (g.degree - 1):
                    raise PlanError(f"{where}: degree must be a power of two")
                if g.ulysses * g.ring != g.degree:
                    raise PlanError(f"{where}: ulysses({g.ulysses}) x ring({g.ring}) must equal the degree")
                if g.first_rank != at or g.first_rank % g.degree:
                    raise PlanError(f"{where}: groups must be laid on consecutive ranks from 0, aligned to their degree")
                if prev is not None and g.degree > prev:
                    raise PlanError(f"{where}: groups must come in decreasing degree")
                if not g.seq_ids:
                    raise PlanError(f"{where}: a used group must hold at least one sequence")
                tokens = 0
                for i in g.seq_ids:
                    if not 0 <= i < n:
                        raise PlanError(f"{where}: sequence id {i} is outside the batch of {n}")
                    seen[i] += 1
                    tokens += int(lengths[i])
                if tokens > g.degree * capacity:
                    raise PlanError(f"{where}: {tokens} tokens exceed {g.degree} x capacity {capacity}")
                at += g.degree
                prev = g.degree
            if at > self.world or (all_busy and at != self.world):
                raise PlanError(f"micro-batch {m}: groups cover {at} ranks but the world has {self.world}")
        bad = [i for i, c in enumerate(seen) if c != 1]
        if bad:
            raise PlanError(f"sequences {bad[:5]} appear {[seen[i] for i in bad[:5]]} times; each must appear exactly once")


def lay_out(groups: list[tuple[int, str, list[int]]], cost_split) -> MicroBatchPlan:
    """Place (degree, algorithm, seq_ids) groups on consecutive ranks in decreasing degree.

    cost_split(degree, algorithm) -> (ulysses, ring). Sorting by decreasing degree makes every
    start a sum of larger powers of two, hence a multiple of the group's own degree.
    """
    out, at = [], 0
    for d, algo, ids in sorted(groups, key=lambda g: -g[0]):
        u, r = cost_split(d, algo)
        out.append(GroupPlan(d, algo, at, tuple(ids), u, r))
        at += d
    return MicroBatchPlan(tuple(out))
