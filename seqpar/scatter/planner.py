"""The step planner: micro-batches, group assignment, cross-micro-batch search, bound (pure).

    cm = build_cost_model(load_profile("A100-40GB"), resolve_model("gpt-7b"), world=64)
    res = plan_step(cm, lengths)                 # PlanResult
    res.plan.validate(lengths, cm.capacity)
    print(res.predicted_step_s, res.lower_bound_s, res.gap, res.solve_s)

Steps (specs/adaptive-scattering.md, with our changes marked): micro-batches are built as
levels (``levels``: the longest sequence sets a micro-batch's makespan, shorter ones fill the
time and memory beside it; ours, replacing the spec's contiguous chunking, which left micro-
batches 24-44% empty in memory or full of short sequences in 32-rank groups); a cross-micro-
batch local search (``refine``: pour sequences into idle rank-time, dissolve micro-batches)
follows; further level builds with other rules (``DEFAULT_BUILDS``) run while time allows; then
each micro-batch goes to the MILP on HiGHS warm-started from its groups with the time left,
and the MILP's groups are kept only when faster. The spec's contiguous chunking with the
greedy is the fallback when a level micro-batch cannot occupy every rank.

World sizes that are not powers of two are supported: groups have power-of-two degrees laid in
decreasing degree, so they stay aligned; the largest group is the largest power of two <= world.
When ``all_busy`` cannot be met (a micro-batch with too few sequences to occupy every rank of
such a world), the planner lets ranks idle instead of failing and reports
``stats["all_busy"] = False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from seqpar.scatter.costmodel import CostModel, CostTable
from seqpar.scatter.greedy import Grouping, evaluate_groups, greedy_groups, improve
from seqpar.scatter.levels import LevelBuild, complete_groups, level_microbatches
from seqpar.scatter.milp import solve_groups
from seqpar.scatter.partition import adaptive_buckets, chunk_by_cost, min_microbatches, seq_work
from seqpar.scatter.plan import Plan, PlanError, lay_out
from seqpar.scatter.refine import refine_step


#: Level builds of the planner, in order (the first always runs, the others while time is left).
#: Chosen on commoncrawl / github / wikipedia at 64 x A100-40GB, GPT-7B, 512 sequences, seeds
#: 0-3, and checked on seeds 4-7 (README "Adaptive scattering"): each build wins on some batches.
DEFAULT_BUILDS = (LevelBuild(1.1, lead=2), LevelBuild(1.2, fast_openers=True, lead=6), LevelBuild(1.0),
                  LevelBuild(1.1, lead=1))


@dataclass
class PlannerOptions:
    """buckets: initial Q of the MILP; allow_degree1: groups of one rank; all_busy: every rank
    works in every micro-batch; time_limit_s: wall-clock budget of the whole step (the first
    level build and its search always run; further builds and the MILP only within it), or
    None for a deterministic plan (every build and search runs to its end and each micro-batch
    MILP stops at ``milp_nodes`` branch-and-bound nodes instead of a clock: the same inputs
    give the same plan on any machine, however busy; for tests and reproducible reports);
    builds: the level builds tried, in order (``levels.LevelBuild``: target-makespan factor,
    opener rule, lookahead); use_milp: False stops after the heuristics (the MILP's warm
    start); milp_nodes: the node limit of each micro-batch MILP when time_limit_s is None;
    bound_time_s: HiGHS time of the level-MILP lower bound (``bound``), spent after the plan and
    not counted in solve_s; 0 keeps only ``lower_bound``; None solves it without a clock, to
    HiGHS's relative gap ``bound_gap``."""

    buckets: int = 16
    allow_degree1: bool = True
    all_busy: bool = True
    time_limit_s: float | None = 1.0
    builds: tuple[LevelBuild, ...] = DEFAULT_BUILDS
    use_milp: bool = True
    milp_nodes: int = 200
    bound_time_s: float | None = 4.0
    bound_gap: float = 1e-4

    def __post_init__(self) -> None:
        if self.time_limit_s is not None and self.time_limit_s < 0:
            raise ValueError(f"time_limit_s={self.time_limit_s} must be >= 0 seconds, or None for a deterministic plan")
        if self.bound_time_s is not None and self.bound_time_s < 0:
            raise ValueError(f"bound_time_s={self.bound_time_s} must be >= 0 seconds (0: no MILP bound), or None")
        if self.milp_nodes < 1:
            raise ValueError(f"milp_nodes={self.milp_nodes} must be >= 1")

    @property
    def deterministic(self) -> bool:
        return self.time_limit_s is None


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


def step_lower_bound(cm: CostModel, lengths, allow_degree1: bool = True, time_limit_s: float | None = 4.0,
                     mip_rel_gap: float = 1e-4) -> tuple[float, dict]:
    """max(``lower_bound``, the level MILP's dual bound within ``time_limit_s``; None: no clock,
    solved to ``mip_rel_gap``; 0: no MILP) and {"bound_s": seconds spent, "bound_method":
    "closed-form" or "level-milp", "level_milp": its info}."""
    t0 = time.perf_counter()
    lb = lower_bound(cm, lengths, allow_degree1)
    info: dict = {"bound_method": "closed-form"}
    if time_limit_s is None or time_limit_s > 0:
        from seqpar.scatter.bound import level_bound

        got, milp = level_bound(cm, lengths, allow_degree1, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)
        info["level_milp"] = milp
        if got > lb:
            lb, info["bound_method"] = got, "level-milp"
    info["bound_s"] = time.perf_counter() - t0
    return lb, info


def groups_to_plan(tab: CostTable, micro: list[Grouping]) -> Plan:
    cm = tab.cm
    mbs, times = [], []
    for groups in micro:
        t, algos = evaluate_groups(tab, groups)
        mbs.append(lay_out([(d, a, ids) for (d, ids), a in zip(groups, algos)], cm.split))
        times.append(t)
    return Plan(world=cm.world, micro_batches=mbs, predicted_step_s=sum(times), micro_batch_s=times)


def _step_time(tab: CostTable, micro: list[Grouping]) -> float:
    return sum(evaluate_groups(tab, g)[0] for g in micro)


def level_plan(tab: CostTable, opts: PlannerOptions, work: np.ndarray, build: LevelBuild = LevelBuild(),
               deadline: float = float("inf")) -> list[Grouping] | None:
    """Level micro-batches by ``build``'s rules, completed onto every rank, then the cross-micro-
    batch search; None when some micro-batch cannot occupy every rank (``all_busy``)."""
    levels = level_microbatches(tab, work, build.average, opts.allow_degree1, build.fast_openers, build.lead)
    micro = [complete_groups(tab, g, opts.allow_degree1, opts.all_busy) for g in levels]
    if any(g is None for g in micro):
        return None
    return refine_step(tab, micro, opts.allow_degree1, opts.all_busy, deadline=deadline)


def chunked_plan(tab: CostTable, opts: PlannerOptions, work) -> list[Grouping] | None:
    """The spec's chunking: contiguous chunks by predicted cost from M_min upwards until the
    greedy places every chunk; the fallback when level micro-batches cannot keep all ranks busy."""
    cm, lengths = tab.cm, tab.lengths
    for m in range(min_microbatches(cm, lengths), len(lengths) + 1):
        chunks = chunk_by_cost(cm, lengths, m, work)
        if chunks is None:
            continue
        micro = [greedy_groups(tab, c, opts.allow_degree1, opts.all_busy) for c in chunks]
        if all(g is not None for g in micro):
            return micro
    return None


def heuristic_plan(tab: CostTable, opts: PlannerOptions, work, deadline: float) -> list[Grouping] | None:
    """The best of the level builds (``opts.builds``: the first always, each further one only
    when the previous build's duration still fits before ``deadline``; their searches stop at
    ``deadline``) and, only when those fail, the spec's chunking."""
    w = np.array([x for x, _ in work], dtype=np.float64)
    best, best_t = None, float("inf")
    took = 0.0
    for k, build in enumerate(opts.builds):
        start = time.perf_counter()
        if k and start + took > deadline:  # the next build would likely overrun the budget
            break
        micro = level_plan(tab, opts, w, build, deadline)
        took = time.perf_counter() - start
        if micro is not None and _step_time(tab, micro) < best_t:
            best, best_t = micro, _step_time(tab, micro)
    return best if best is not None else chunked_plan(tab, opts, work)


def milp_pass(tab: CostTable, micro: list[Grouping], opts: PlannerOptions, deadline: float) -> tuple[list[Grouping], int]:
    """Each micro-batch on HiGHS, warm-started from its groups, with an equal share of the time
    left; the MILP's groups (locally improved) replace the heuristic's only when faster."""
    cm, lengths = tab.cm, tab.lengths
    out, wins = [], 0
    for k, groups in enumerate(micro):
        left = deadline - time.perf_counter()
        ids = [i for _, g in groups for i in g]
        if left > 0.05 and len(ids) > 1:  # HiGHS needs ~tens of ms to set up a model
            buckets = adaptive_buckets(cm, lengths, ids, opts.buckets)
            limit = {"node_limit": opts.milp_nodes} if opts.deterministic else {"time_limit_s": left / (len(micro) - k)}
            got = solve_groups(cm, lengths, ids, buckets, warm=groups, allow_degree1=opts.allow_degree1,
                               all_busy=opts.all_busy, **limit)
            if got is not None:
                got = improve(tab, got)
                if evaluate_groups(tab, got)[0] < evaluate_groups(tab, groups)[0] - 1e-12:
                    groups = got
                    wins += 1
        out.append(groups)
    return out, wins


def plan_step(cm: CostModel, lengths, opts: PlannerOptions | None = None) -> PlanResult:
    """Plan one step: every sequence once, groups aligned, memory within K; see the module doc."""
    opts = opts or PlannerOptions()
    check_batch(cm, lengths)
    t0, cpu0 = time.perf_counter(), time.process_time()
    # 15% left for HiGHS overrunning its limit and the layout; no clock at all when deterministic
    deadline = float("inf") if opts.deterministic else t0 + 0.85 * opts.time_limit_s
    tab = CostTable(cm, lengths)
    work = seq_work(tab, opts.allow_degree1)
    all_busy = opts.all_busy
    micro = heuristic_plan(tab, opts, work, deadline)
    if micro is None:
        if not opts.all_busy:
            raise PlanError(f"no feasible plan for {len(lengths)} sequences on {cm.world} ranks")
        # Documented fallback: some micro-batch cannot occupy every rank (e.g. one sequence on a
        # world that is not a power of two); plan with idle ranks and say so in the stats.
        all_busy = False
        opts = PlannerOptions(**{**opts.__dict__, "all_busy": False})
        micro = heuristic_plan(tab, opts, work, deadline)
        if micro is None:
            raise PlanError(f"no feasible plan for {len(lengths)} sequences on {cm.world} ranks")
    heuristic_s = time.perf_counter() - t0
    method, wins = "levels", 0
    if opts.use_milp:
        micro, wins = milp_pass(tab, micro, opts, deadline)
        method = "levels+milp" if wins else "levels (milp kept them)"
    plan = groups_to_plan(tab, micro)
    solve_s = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0  # this process's CPU seconds: wall time minus contention
    lb, binfo = step_lower_bound(cm, lengths, opts.allow_degree1, opts.bound_time_s, opts.bound_gap)
    stats = {"max_tokens_per_rank": plan.max_tokens_per_rank(lengths), "milp_improved_microbatches": wins,
             "all_busy": all_busy, "heuristic_s": heuristic_s, "solve_cpu_s": cpu_s,
             "bound_s": binfo["bound_s"], "bound_method": binfo["bound_method"]}
    return PlanResult(plan, plan.predicted_step_s, lb, solve_s, method, stats)
