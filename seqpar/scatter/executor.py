"""Running adaptive plans: per micro-batch, this rank's group, stream, layout and shard.

    ex = AdaptiveExecutor(steps, capacity, pool, world_group, device, source=PlannerProcess(cm, opts))
    ex.request(0); plan = ex.plan(0)            # collective: rank 0 broadcasts, every rank validates
    ex.request(1)                               # rank 0's planner works on step 1 while step 0 trains
    micro_batches = ex.build(0, plan)           # no collectives: safe in the data thread

For each micro-batch of the plan, this rank finds its group, packs the group's sequences into one
stream (each sequence its own document), computes labels, positions and document ids on that
stream, and shards it with the group's layout: zigzag for ring and hybrid, contiguous for Ulysses,
whole for degree 1 (specs/adaptive-scattering.md, "Executor"). Every rank runs every micro-batch:
a rank outside every group of a micro-batch (idle ranks of a plan that cannot keep all busy) runs
an empty pass, since FSDP's all-gathers and reduce-scatters are collective over all ranks. Loss
and gradients follow ARCHITECTURE.md's rule (sum of token losses over the step's global target
count, gradients summed), so any plan gives the single-device result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from seqpar.data.varlen import VarlenSteps
from seqpar.parallel.pool import GroupPool
from seqpar.scatter.plan import GroupPlan, Plan, PlanError
from seqpar.scatter.plan_source import PlanReply, PlanSource
from seqpar.train.batch import MicroBatch, SPAssignment, empty_microbatch, make_microbatch, shard_microbatch

#: The layout of each group algorithm (a degree-1 group keeps its stream whole).
LAYOUT_OF = {"ring": "zigzag", "hybrid": "zigzag", "ulysses": "contiguous"}


class ExecutorError(RuntimeError):
    """A plan cannot run here; the message names the step, micro-batch and group."""


@dataclass(frozen=True)
class StepPlan:
    """A validated plan and what rank 0's planner said about it (the same on every rank)."""

    step: int
    plan: Plan
    solve_s: float
    method: str
    wait_s: float  # how long rank 0 waited for the planner after the previous step's backward

    @property
    def degrees(self) -> str:
        """'4+2+1+1 | 2+2' style summary of the group degrees per micro-batch."""
        return " | ".join("+".join(str(g.degree) for g in mb.groups) for mb in self.plan.micro_batches)


def group_assignment(g: GroupPlan, pool: GroupPool) -> SPAssignment | None:
    """This rank's SP assignment for pool group ``g`` (None for a degree-1 group: local attention)."""
    if g.degree == 1:
        return None
    return SPAssignment(g.algorithm, LAYOUT_OF[g.algorithm], pool.get(g.first_rank, g.degree, g.ulysses))


def check_algorithms(plan: Plan) -> None:
    """PlanError unless each group's algorithm fits its degree and split: local at degree 1, else
    ring (ulysses 1), ulysses (ring 1) or hybrid (both > 1)."""
    for m, mb in enumerate(plan.micro_batches):
        for j, g in enumerate(mb.groups):
            ok = {"local": g.degree == 1, "ring": g.degree > 1 and g.ulysses == 1,
                  "ulysses": g.degree > 1 and g.ring == 1, "hybrid": g.ulysses > 1 and g.ring > 1}.get(g.algorithm, False)
            if not ok:
                raise PlanError(f"micro-batch {m} group {j} (degree {g.degree}, first rank {g.first_rank}): algorithm "
                                f"{g.algorithm!r} does not fit ulysses {g.ulysses} x ring {g.ring}; use local at degree 1, "
                                "ring (ulysses 1), ulysses (ring 1) or hybrid (both > 1)")


class AdaptiveExecutor:
    """Plans broadcast from rank 0 and this rank's micro-batches of each plan.

    steps: the run's variable-length steps (every rank computes any step's lengths); capacity:
    K tokens per rank the plans must respect; pool: the adaptive group pool (all aligned power-of-
    two groups and their splits); group: the world (the plan broadcast); device: where micro-
    batches run; source: rank 0's planner (None on the other ranks).
    """

    def __init__(self, steps: VarlenSteps, capacity: int, pool: GroupPool, group: dist.ProcessGroup,
                 device: torch.device, source: PlanSource | None, num_steps: int) -> None:
        self.steps, self.capacity, self.pool, self.group = steps, capacity, pool, group
        self.device, self.source, self.num_steps = device, source, num_steps
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank == 0 and source is None:
            raise ValueError("rank 0 needs a plan source")

    # -- plans (main thread: the broadcast is collective) ----------------------------------------
    def request(self, step: int) -> None:
        """Rank 0 asks its planner for ``step`` (no-op elsewhere or past the last step)."""
        if self.rank == 0 and step < self.num_steps:
            self.source.request(step, self.steps.step_lengths(step))

    def plan(self, step: int) -> StepPlan:
        """The plan of ``step`` on every rank: rank 0 collects it and broadcasts it, every rank
        validates it against the step's lengths and the capacity. Collective over the world."""
        import time

        payload: list = [None]
        if self.rank == 0:
            t0 = time.perf_counter()
            reply: PlanReply = self.source.result(step)
            payload[0] = (reply.plan_json, reply.solve_s, reply.method, time.perf_counter() - t0, reply.error)
        if self.world > 1:
            dist.broadcast_object_list(payload, src=0, group=self.group)
        text, solve_s, method, wait_s, error = payload[0]
        if error:
            raise ExecutorError(f"the planner found no plan for step {step + 1}: {error}")
        plan = Plan.from_json(text)
        lengths = self.steps.step_lengths(step)
        try:
            if plan.world != self.world:
                raise PlanError(f"the plan is for {plan.world} ranks but the world has {self.world}")
            plan.validate(lengths, self.capacity, all_busy=False)
            check_algorithms(plan)
        except PlanError as e:
            raise ExecutorError(f"the plan of step {step + 1} does not validate: {e}") from None
        return StepPlan(step, plan, solve_s, method, wait_s)

    # -- micro-batches (no collectives: runs in the data thread) --------------------------------
    def build(self, step: int, plan: StepPlan, device: torch.device | None = None,
              sequences: list[np.ndarray] | None = None) -> list[MicroBatch]:
        """This rank's micro-batches of ``step``, one per plan micro-batch, on ``device`` (default
        the executor's; the data thread builds on the host and the main thread moves them).
        sequences: the step's tokens read ahead (default: read here)."""
        device = self.device if device is None else device
        out = []
        for g in plan.plan.groups_of_rank(self.rank):  # None: this rank idles, an empty pass
            if g is None:
                out.append(empty_microbatch(device))
                continue
            s = self.steps.stream_of(step, list(g.seq_ids), sequences)
            mb = make_microbatch(s.tokens, s.cu_seqlens, device)
            sp = group_assignment(g, self.pool)
            out.append(mb if sp is None else shard_microbatch(mb, sp, self.device))
        return out

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

