"""Baselines on the same cost model: static degree, batch-adaptive, greedy (pure).

    t, plan = static_plan(cm, lengths, degree=8)        # one degree, best-fit packing
    best = static_best(cm, batches)                     # {"degree", "predicted_step_s", ...}
    ba = batch_adaptive(cm, batches)                    # best degree chosen per batch
    g = greedy_plan(cm, lengths)                        # PlanResult of the spec's greedy

Static SP is what Megatron-CP / DeepSpeed-Ulysses do: every group has the same degree d, so a
micro-batch has R // d groups; sequences are best-fit-decreasing packed into buffers of d x K
tokens, buffers sorted by predicted time, and consecutive runs of R // d buffers form the
micro-batches. Each static degree runs its cheapest algorithm for the data.
"""

from __future__ import annotations

import time

from seqpar.scatter.costmodel import CostModel, CostTable, degrees_upto
from seqpar.scatter.greedy import pack_groups
from seqpar.scatter.partition import chunk_by_cost, min_microbatches, seq_work
from seqpar.scatter.plan import Plan, PlanError, lay_out
from seqpar.scatter.planner import PlannerOptions, PlanResult, check_batch, groups_to_plan, lower_bound, plan_step


def best_fit_pack(lengths, ids: list[int], cap: int) -> list[list[int]]:
    """Best-fit decreasing: each sequence (longest first) into the fullest buffer that holds it."""
    bins: list[list] = []  # [tokens, ids]
    for i in sorted(ids, key=lambda i: -int(lengths[i])):
        s = int(lengths[i])
        fit = [b for b in bins if b[0] + s <= cap]
        if fit:
            b = max(fit, key=lambda b: b[0])
            b[0] += s
            b[1].append(i)
        else:
            bins.append([s, [i]])
    return [b[1] for b in bins]


def static_plan(cm: CostModel, lengths, degree: int, algorithm: str | None = None) -> tuple[float, Plan] | None:
    """Step time (seconds) and plan at one static degree; None when the longest sequence does not fit."""
    check_batch(cm, lengths)
    if degree > cm.max_degree or max(cm.min_degree(int(s)) for s in lengths) > degree:
        return None
    algo = algorithm or cm.degree_algorithm(degree, [int(s) for s in lengths])
    packs = best_fit_pack(lengths, list(range(len(lengths))), degree * cm.capacity)
    times = {id(p): cm.group_time([int(lengths[i]) for i in p], degree, algo) for p in packs}
    packs.sort(key=lambda p: -times[id(p)])
    per_mb = cm.world // degree
    mbs, mb_t = [], []
    for k in range(0, len(packs), per_mb):
        chunk = packs[k:k + per_mb]
        mbs.append(lay_out([(degree, algo, p) for p in chunk], cm.split))
        mb_t.append(max(times[id(p)] for p in chunk))
    plan = Plan(world=cm.world, micro_batches=mbs, predicted_step_s=sum(mb_t), micro_batch_s=mb_t)
    return plan.predicted_step_s, plan


def static_best(cm: CostModel, batches: list) -> dict:
    """The one degree with the least summed step time over all batches (None-safe)."""
    best = None
    for d in degrees_upto(cm.max_degree):
        res = [static_plan(cm, b, d) for b in batches]
        if any(r is None for r in res):
            continue
        total = sum(r[0] for r in res)
        if best is None or total < best["total_s"]:
            algo = res[0][1].micro_batches[0].groups[0].algorithm
            best = {"degree": d, "algorithm": algo, "total_s": total, "per_step_s": [r[0] for r in res],
                    "predicted_step_s": total / len(batches), "plans": [r[1] for r in res]}
    if best is None:
        raise PlanError("no static degree holds the longest sequence; add ranks or memory")
    return best


def batch_adaptive(cm: CostModel, batches: list) -> dict:
    """One degree per batch (the best static degree of that batch)."""
    per, degrees = [], []
    for b in batches:
        r = static_best(cm, [b])
        per.append(r["predicted_step_s"])
        degrees.append(r["degree"])
    return {"predicted_step_s": sum(per) / len(per), "per_step_s": per, "degrees": degrees}


def greedy_plan(cm: CostModel, lengths, opts: PlannerOptions | None = None) -> PlanResult:
    """The spec's greedy: contiguous cost chunks from M_min upwards until every chunk packs;
    per micro-batch, minSP groups, best-fit packing, slowest groups grown with spare ranks
    (no local search, no MILP)."""
    o = opts or PlannerOptions()
    check_batch(cm, lengths)
    t0 = time.perf_counter()
    tab = CostTable(cm, lengths)
    work = seq_work(tab, o.allow_degree1)
    for all_busy in (o.all_busy, False):
        for m in range(min_microbatches(cm, lengths), len(lengths) + 1):
            chunks = chunk_by_cost(cm, lengths, m, work)
            if chunks is None:
                continue
            micro = [pack_groups(tab, c, o.allow_degree1, all_busy) for c in chunks]
            if all(g is not None for g in micro):
                plan = groups_to_plan(tab, micro)
                return PlanResult(plan, plan.predicted_step_s, lower_bound(cm, lengths, o.allow_degree1),
                                  time.perf_counter() - t0, "greedy",
                                  {"max_tokens_per_rank": plan.max_tokens_per_rank(lengths), "all_busy": all_busy})
    raise PlanError(f"greedy found no feasible plan for {len(lengths)} sequences on {cm.world} ranks")


def warm_start_plan(cm: CostModel, lengths, opts: PlannerOptions | None = None) -> PlanResult:
    """The planner without the MILP (its warm start: level micro-batches, the greedy's group
    constructions, the cross-micro-batch search), under the same time limit."""
    o = opts or PlannerOptions()
    return plan_step(cm, lengths, PlannerOptions(**{**o.__dict__, "use_milp": False, "bound_time_s": 0.0}))


def compare(cm: CostModel, batches: list, opts: PlannerOptions | None = None) -> dict:
    """Planner and every baseline over the same batches: mean step seconds, bounds, speedups."""
    opts = opts or PlannerOptions()
    results = [plan_step(cm, b, opts) for b in batches]
    greedy = [greedy_plan(cm, b, opts) for b in batches]
    warm = [warm_start_plan(cm, b, opts) for b in batches]
    t0 = time.perf_counter()
    static = static_best(cm, batches)
    ba = batch_adaptive(cm, batches)
    static_s = time.perf_counter() - t0
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    pred = mean([r.predicted_step_s for r in results])
    lb = mean([r.lower_bound_s for r in results])  # max(closed-form, level MILP) per step
    g = mean([r.predicted_step_s for r in greedy])
    return {
        "results": results,
        "predicted_step_s": pred,
        "lower_bound_s": lb,
        "gap": pred / lb - 1.0,
        "solve_s": max(r.solve_s for r in results),
        "solve_cpu_s": max(r.stats["solve_cpu_s"] for r in results),
        "heuristic_s": max(r.stats["heuristic_s"] for r in results),
        "bound_s": max(r.stats["bound_s"] for r in results),
        "baselines": {
            "static_best": {"degree": static["degree"], "algorithm": static["algorithm"],
                            "predicted_step_s": static["predicted_step_s"], "speedup": static["predicted_step_s"] / pred,
                            "gap": static["predicted_step_s"] / lb - 1.0},
            "batch_adaptive": {"degrees": ba["degrees"], "predicted_step_s": ba["predicted_step_s"],
                               "speedup": ba["predicted_step_s"] / pred, "gap": ba["predicted_step_s"] / lb - 1.0},
            "greedy": {"predicted_step_s": g, "speedup": g / pred, "gap": g / lb - 1.0,
                       "solve_s": max(r.solve_s for r in greedy)},
            "warm_start": {"predicted_step_s": mean([r.predicted_step_s for r in warm]),
                           "speedup": mean([r.predicted_step_s for r in warm]) / pred,
                           "solve_s": max(r.solve_s for r in warm)},
        },
        "baseline_solve_s": static_s,
    }
