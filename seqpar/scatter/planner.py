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
largest power of two <= world. When ``all_busy`` cannot be met (a micro-batch with too few
sequences to occupy every rank of such a world), the planner lets ranks idle instead of failing
and reports ``stats["all_busy"] = False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from seqpar.scatter.costmodel import CostModel, CostTable
from seqpar.scatter.greedy import Groups, evaluate_groups, greedy_groups, improve
from seqpar.scatter.milp import solve_groups
from seqpar.scatter.partition import adaptive_buckets, chunk_by_cost, chunk_lpt, min_microbatches, rank_need, seq_work
from seqpar.scatter.plan import Plan, PlanError, lay_out


@dataclass
class PlannerOptions:
    """buckets: initial Q; allow_degree1: groups of one rank; all_busy: every rank works in every
    micro-batch; time_limit_s: HiGHS budget for the whole step; extra_microbatches: further M
    tried above the first feasible one; fills: extra chunk fill factors (share of R x K tokens
    and of R ranks of need) tried, since full micro-batches pack badly; use_milp: False gives
    the greedy planner."""

    buckets: int = 16
    allow_degree1: bool = True
    all_busy: bool = True
    time_limit_s: float = 1.0
    extra_microbatches: int = 1
    fills: tuple[float, ...] = (0.85,)
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

    Let T*_k be sequence k's best time as a group of its own (incl. b1, b2) over feasible
    degrees, and w_k its least rank-seconds. The maximum of three valid bounds:
    - work: each micro-batch lasts >= b1 + (its w) / R (groups never exceed R ranks, each pays
      b1), and there are >= M_min = ceil(total / (R K)) micro-batches: M_min b1 + W / R;
    - longest: max_k T*_k + (M_min - 1) b1;
    - memory by threshold: a sequence with T*_k >= tau sits in a micro-batch lasting >= tau, and
      a micro-batch holds <= R K tokens, so #{micro-batches lasting >= tau} >= ceil(N_tau / (R K))
      with N_tau the tokens of those sequences; the step is the integral over tau of that count.
    """
    check_batch(cm, lengths)
    work = seq_work(CostTable(cm, lengths), allow_degree1)
    m = min_microbatches(cm, lengths)
    total_w = sum(w for w, _ in work)
    t_max = max(t for _, t in work)
    cap = cm.world * cm.capacity
    order = sorted(range(len(lengths)), key=lambda k: -work[k][1])
    memory, tokens = 0.0, 0
    for j, k in enumerate(order):
        tokens += int(lengths[k])
        nxt = work[order[j + 1]][1] if j + 1 < len(order) else 0.0
        memory += (work[k][1] - nxt) * -(-tokens // cap)
    return max(m * cm.b1 + total_w / cm.world, t_max + (m - 1) * cm.b1, memory)


def groups_to_plan(tab: CostTable, micro: list[Groups]) -> Plan:
    cm = tab.cm
    mbs, times = [], []
    for groups in micro:
        t, algos = evaluate_groups(tab, groups)
        mbs.append(lay_out([(d, a, ids) for (d, ids), a in zip(groups, algos)], cm.split))
        times.append(t)
    return Plan(world=cm.world, micro_batches=mbs, predicted_step_s=sum(times), micro_batch_s=times)


def greedy_microbatches(tab: CostTable, opts: PlannerOptions, work) -> list[Groups]:
    """Chunk + greedy for several M; keep the least summed makespan.

    Candidate families, each from its first M upwards until ``extra_microbatches + 1`` values
    of M were feasible (M rises past infeasible ones): token-capped chunks from M_min; chunks
    that also keep the packing heuristic's rank need within R, from max(M_min, ceil(need / R));
    and the latter filled only to each of ``opts.fills`` (emptier micro-batches pack better).
    Both chunkers are tried at each M.
    """
    cm, lengths = tab.cm, tab.lengths
    n = len(lengths)
    m_min = min_microbatches(cm, lengths)
    need = rank_need(tab)
    best, best_t = None, float("inf")

    def attempt(m: int, nd, fill: float) -> bool:
        nonlocal best, best_t
        ok = False
        for chunker in (chunk_by_cost, chunk_lpt):
            chunks = chunker(cm, lengths, m, work, nd, fill)
            if chunks is None:
                continue
            micro = [greedy_groups(tab, c, opts.allow_degree1, opts.all_busy) for c in chunks]
            if all(g is not None for g in micro):
                ok = True
                t = sum(evaluate_groups(tab, g)[0] for g in micro)
                if t < best_t:
                    best, best_t = micro, t
        return ok

    for nd, fill in ((None, 1.0), (need, 1.0)) + tuple((need, f) for f in opts.fills):
        m = max(m_min, -(-int(sum(need) if nd else 0) // int(cm.world * fill)))
        tried = 0
        while m <= n and tried <= opts.extra_microbatches:
            tried += attempt(m, nd, fill)
            m += 1
    if best is None:
        raise PlanError(f"no feasible plan for {n} sequences on {cm.world} ranks "
                        "(all_busy may leave too few sequences to occupy every rank); allow idle ranks or add sequences")
    return best


def plan_step(cm: CostModel, lengths, opts: PlannerOptions | None = None) -> PlanResult:
    """Plan one step: every sequence once, groups aligned, memory within K; see the module doc."""
    opts = opts or PlannerOptions()
    check_batch(cm, lengths)
    t0 = time.perf_counter()
    tab = CostTable(cm, lengths)
    work = seq_work(tab, opts.allow_degree1)
    all_busy = opts.all_busy
    try:
        micro = greedy_microbatches(tab, opts, work)
    except PlanError:
        if not opts.all_busy:
            raise
        # Documented fallback: some micro-batch cannot occupy every rank (e.g. one sequence on a
        # world that is not a power of two); plan with idle ranks and say so in the stats.
        all_busy = False
        opts = PlannerOptions(**{**opts.__dict__, "all_busy": False})
        micro = greedy_microbatches(tab, opts, work)
    method = "greedy"
    milp_wins = 0
    if opts.use_milp:
        deadline = t0 + 0.9 * opts.time_limit_s  # 10% left for mapping buckets back and the layout
        out = []
        for k, groups in enumerate(micro):
            left = deadline - time.perf_counter()
            ids = [i for _, g in groups for i in g]
            t_greedy = evaluate_groups(tab, groups)[0]
            got = None
            if left > 0.02 and len(ids) > 1:
                buckets = adaptive_buckets(cm, lengths, ids, opts.buckets)
                got = solve_groups(cm, lengths, ids, buckets, warm=groups, time_limit_s=left / (len(micro) - k),
                                   allow_degree1=opts.allow_degree1, all_busy=opts.all_busy)
            if got is not None:
                got = improve(tab, got)
                if evaluate_groups(tab, got)[0] < t_greedy - 1e-12:
                    groups = got
                    milp_wins += 1
            out.append(groups)
        micro = out
        method = "milp" if milp_wins else "milp(greedy kept)"
    plan = groups_to_plan(tab, micro)
    solve_s = time.perf_counter() - t0
    lb = lower_bound(cm, lengths, opts.allow_degree1)
    stats = {"max_tokens_per_rank": plan.max_tokens_per_rank(lengths), "milp_improved_microbatches": milp_wins,
             "all_busy": all_busy}
    return PlanResult(plan, plan.predicted_step_s, lb, solve_s, method, stats)
