"""The step planner: chunking, bucketing, MILP group assignment, lower bound (pure).

    cm = build_cost_model(load_profile("A100-40GB"), resolve_model("gpt-7b"), world=64)
    res = plan_step(cm, lengths)                 # PlanResult
    res.plan.validate(lengths, cm.capacity)
    print(res.predicted_step_s, res.lower_bound_s, res.gap, res.solve_s)

Steps (specs/adaptive-scattering.md): M starts at ceil(total / (R K)) and rises until every
micro-batch is feasible; a few M are tried and the least summed greedy makespan kept; each
micro-batch is bucketed and solved on HiGHS warm-started from greedy under a time limit; greedy
is always the fallback. World sizes that are not powers of two are supported: groups have
power-of-two degrees laid in decreasing degree, so they stay aligned; the largest group is the
largest power of two <= world.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from seqpar.scatter.costmodel import CostModel
from seqpar.scatter.greedy import Groups, evaluate_groups, greedy_groups, improve
from seqpar.scatter.milp import solve_groups
from seqpar.scatter.partition import adaptive_buckets, chunk_by_cost, min_microbatches, seq_work
from seqpar.scatter.plan import Plan, PlanError, lay_out


@dataclass
class PlannerOptions:
    """buckets: initial Q; allow_degree1: groups of one rank; all_busy: every rank works in every
    micro-batch; time_limit_s: HiGHS budget for the whole step; extra_microbatches: further M
    tried above the first feasible one; use_milp: False gives the greedy planner."""

    buckets: int = 16
    allow_degree1: bool = True
    all_busy: bool = True
    time_limit_s: float = 1.0
    extra_microbatches: int = 2
    use_milp: bool = True


@dataclass
class PlanResult:
    """A plan and its numbers (seconds); gap = predicted / lower bound - 1."""

    plan: Plan
    predicted_step_s: float
    lower_bound_s: float
    solve_s: float
    method: str
    stats: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return self.predicted_step_s / self.lower_bound_s - 1.0 if self.lower_bound_s > 0 else 0.0

    @property
    def max_tokens_per_rank(self) -> float:
        return self.stats.get("max_tokens_per_rank", 0.0)


def check_batch(cm: CostModel, lengths) -> None:
    """One-line errors for an empty batch, bad lengths or a sequence the cluster cannot hold."""
    if len(lengths) == 0:
        raise PlanError("empty batch: nothing to plan; pass at least one sequence length")
    for i, s in enumerate(lengths):
        if int(s) < 1:
            raise PlanError(f"sequence {i} has length {s}; lengths must be positive token counts")
        if not cm.fits(int(s)):
            raise PlanError(f"sequence {i} has {int(s)} tokens but {cm.max_degree} ranks hold at most "
                            f"{cm.max_degree * cm.capacity} (K={cm.capacity} tokens per rank); split or drop it, "
                            "or add ranks or memory (offload)")


def lower_bound(cm: CostModel, lengths, allow_degree1: bool = True) -> float:
    """A lower bound (seconds) on any feasible step, on actual lengths and any micro-batch split.

    With M >= M_min = ceil(total / (R K)) micro-batches, each micro-batch's makespan is at least
    b1 + (its sequences' least rank-seconds) / R (groups never exceed R ranks, each pays b1) and at
    least the best single-sequence time of each of its sequences. Summed:
    max(M_min b1 + W / R, max_k T*_k + (M_min - 1) b1).
    """
    check_batch(cm, lengths)
    work = [seq_work(cm, int(s), allow_degree1) for s in lengths]
    m = min_microbatches(cm, lengths)
    total_w = sum(w for w, _ in work)
    t_max = max(t for _, t in work)
    return max(m * cm.b1 + total_w / cm.world, t_max + (m - 1) * cm.b1)


def groups_to_plan(cm: CostModel, lengths, micro: list[Groups]) -> Plan:
    mbs, times = [], []
    for groups in micro:
        t, algos = evaluate_groups(cm, lengths, groups)
        mbs.append(lay_out([(d, a, ids) for (d, ids), a in zip(groups, algos)], cm.split))
        times.append(t)
    return Plan(world=cm.world, micro_batches=mbs, predicted_step_s=sum(times), micro_batch_s=times)


def greedy_microbatches(cm: CostModel, lengths, opts: PlannerOptions, work=None) -> list[Groups]:
    """Chunk + greedy for the smallest feasible M and a few more; keep the least summed makespan."""
    m = min_microbatches(cm, lengths)
    if work is None:
        work = [seq_work(cm, int(s), opts.allow_degree1) for s in lengths]
    best, best_t, tried = None, float("inf"), 0
    while m <= len(lengths) and tried <= opts.extra_microbatches:
        chunks = chunk_by_cost(cm, lengths, m, opts.allow_degree1, work)
        micro = None
        if chunks is not None:
            micro = [greedy_groups(cm, lengths, c, opts.allow_degree1, opts.all_busy) for c in chunks]
        if micro is not None and all(g is not None for g in micro):
            t = sum(evaluate_groups(cm, lengths, g)[0] for g in micro)
            tried += 1
            if t < best_t:
                best, best_t = micro, t
        elif best is not None:
            tried += 1
        m += 1
    if best is None:
        raise PlanError(f"no feasible plan for {len(lengths)} sequences on {cm.world} ranks "
                        "(all_busy may leave too few sequences to occupy every rank); allow idle ranks or add sequences")
    return best


def plan_step(cm: CostModel, lengths, opts: PlannerOptions | None = None) -> PlanResult:
    """Plan one step: every sequence once, groups aligned, memory within K; see the module doc."""
    opts = opts or PlannerOptions()
    check_batch(cm, lengths)
    t0 = time.perf_counter()
    work = [seq_work(cm, int(s), opts.allow_degree1) for s in lengths]
    micro = greedy_microbatches(cm, lengths, opts, work)
    method = "greedy"
    milp_wins = 0
    if opts.use_milp:
        deadline = t0 + opts.time_limit_s
        out = []
        for k, groups in enumerate(micro):
            left = deadline - time.perf_counter()
            ids = [i for _, g in groups for i in g]
            t_greedy = evaluate_groups(cm, lengths, groups)[0]
            got = None
            if left > 0.02 and len(ids) > 1:
                buckets = adaptive_buckets(cm, lengths, ids, opts.buckets)
                got = solve_groups(cm, lengths, ids, buckets, warm=groups, time_limit_s=left / (len(micro) - k),
                                   allow_degree1=opts.allow_degree1, all_busy=opts.all_busy)
            if got is not None:
                got = improve(cm, lengths, got)
                if evaluate_groups(cm, lengths, got)[0] < t_greedy - 1e-12:
                    groups = got
                    milp_wins += 1
            out.append(groups)
        micro = out
        method = "milp" if milp_wins else "milp(greedy kept)"
    plan = groups_to_plan(cm, lengths, micro)
    solve_s = time.perf_counter() - t0
    lb = lower_bound(cm, lengths, opts.allow_degree1)
    stats = {"max_tokens_per_rank": plan.max_tokens_per_rank(lengths), "milp_improved_microbatches": milp_wins}
    return PlanResult(plan, plan.predicted_step_s, lb, solve_s, method, stats)
