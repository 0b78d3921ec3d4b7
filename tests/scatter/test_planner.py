"""Planner feasibility, the lower bound against brute force, bucketing, degenerate inputs."""

import itertools

import numpy as np
import pytest

from seqpar.hardware import load_profile
from seqpar.scatter.baselines import greedy_plan, static_best, static_plan
from seqpar.scatter.costmodel import build_cost_model
from seqpar.scatter.partition import bucket_lengths, padded_total
from seqpar.scatter.plan import PlanError
from seqpar.scatter.planner import PlannerOptions, lower_bound, plan_step
from seqpar.scatter.workloads import FAMILIES, resolve_model, synthetic_lengths
from tests.scatter.tiny import brute_force, random_instances, tiny_cost_model


# Tests that judge a plan's quality plan without a clock (``time_limit_s=None``: every build and
# search runs to its end, MILPs stop at a node limit), so the plan does not depend on how busy
# the machine is. Timed planning is covered where only invariants are asserted (test_cli).
DET = PlannerOptions(time_limit_s=None)


@pytest.fixture(scope="module")
def cm64():
    return build_cost_model(load_profile("A100-40GB"), resolve_model("gpt-7b"), 64)


def _check_feasible(cm, lengths, res, all_busy=True):
    res.plan.validate(lengths, cm.capacity, all_busy=all_busy)
    assert res.plan.world == cm.world
    for mb in res.plan.micro_batches:
        for g in mb.groups:
            assert g.first_rank % g.degree == 0 and g.algorithm in cm.algorithms(g.degree)
    assert res.predicted_step_s == pytest.approx(sum(res.plan.micro_batch_s))
    assert res.lower_bound_s <= res.predicted_step_s + 1e-9 and res.gap >= -1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_plans_are_feasible_and_beat_greedy_or_tie(cm64, family):
    lengths = synthetic_lengths(family, 96, seed=3)
    res = plan_step(cm64, lengths, DET)
    _check_feasible(cm64, lengths, res)
    g = greedy_plan(cm64, lengths)
    _check_feasible(cm64, lengths, g)
    assert res.predicted_step_s <= g.predicted_step_s + 1e-9  # greedy is the fallback
    t, plan = static_plan(cm64, lengths, 32)
    plan.validate(lengths, cm64.capacity, all_busy=False)  # static leaves ranks idle when packs run out
    assert t >= res.lower_bound_s - 1e-9


@pytest.mark.parametrize("world, opts", [
    (16, DET),
    (16, PlannerOptions(time_limit_s=None, allow_degree1=False)),
    (16, PlannerOptions(time_limit_s=None, all_busy=False)),
    (24, DET),   # not a power of two: groups 16 + 8 stay aligned
    (12, PlannerOptions(time_limit_s=0.0, use_milp=False)),  # no time: the first build alone, whatever the clock
])
def test_options_and_odd_worlds(world, opts):
    cm = build_cost_model(load_profile("A100-40GB"), resolve_model("llama-1b"), world)
    lengths = synthetic_lengths("github", 48, seed=world, max_len=cm.max_degree * cm.capacity // 2)
    res = plan_step(cm, lengths, opts)
    assert res.stats["all_busy"] == opts.all_busy
    _check_feasible(cm, lengths, res, all_busy=opts.all_busy)
    if not opts.allow_degree1:
        assert all(g.degree >= 2 for mb in res.plan.micro_batches for g in mb.groups)
    assert max(g.degree for mb in res.plan.micro_batches for g in mb.groups) <= cm.max_degree


def test_bound_below_brute_force_and_planner_above_it():
    ratios = []
    for cm, lengths in random_instances(0):
        opt_any = brute_force(cm, lengths, all_busy=False)
        opt_busy = brute_force(cm, lengths, all_busy=True)
        lb = lower_bound(cm, lengths)
        assert lb <= opt_any + 1e-12, (cm.world, lengths, lb, opt_any)
        res = plan_step(cm, lengths, PlannerOptions(time_limit_s=None, bound_time_s=None))
        busy = res.stats["all_busy"]
        _check_feasible(cm, lengths, res, all_busy=busy)
        opt = opt_busy if busy else opt_any  # idle fallback only when all-busy is infeasible
        assert busy or opt_busy == float("inf"), (cm.world, lengths)
        assert res.predicted_step_s >= opt - 1e-9, (cm.world, lengths)
        ratios.append(res.predicted_step_s / opt)
    assert max(ratios) < 1.5, ratios
    assert sorted(ratios)[len(ratios) // 2] < 1.05, ratios


def test_bucketing_dp_is_optimal_on_small_inputs():
    rng = np.random.default_rng(1)
    for _ in range(20):
        lengths = [int(x) for x in rng.integers(1, 50, size=int(rng.integers(1, 8)))]
        q = int(rng.integers(1, 4))
        b = bucket_lengths(lengths, q)
        assert sorted(i for _, ids in b for i in ids) == list(range(len(lengths)))
        assert all(m >= lengths[i] for m, ids in b for i in ids) and len(b) <= q
        vals = sorted(set(lengths))
        def padded(cuts):  # buckets = runs of distinct values between cuts; each pads to its max
            bounds = zip((0,) + cuts, cuts + (len(vals),))
            return sum(vals[c - 1] * sum(1 for x in lengths if vals[a] <= x <= vals[c - 1]) for a, c in bounds)

        best = min(padded(cuts) for k in range(min(q, len(vals))) for cuts in itertools.combinations(range(1, len(vals)), k))
        assert padded_total(b) == best


def test_degenerate_inputs_give_clear_errors(cm64):
    with pytest.raises(PlanError, match="empty batch"):
        plan_step(cm64, [])
    with pytest.raises(PlanError, match=r"sequence 1 has 600000 tokens but 64 ranks hold at most .*split or drop it"):
        plan_step(cm64, [100, 600_000])
    with pytest.raises(PlanError, match="lengths must be positive"):
        lower_bound(cm64, [5, 0])
    with pytest.raises(PlanError, match="split or drop it"):
        static_best(cm64, [[600_000]])
    one = plan_step(cm64, [cm64.capacity * 64], DET)  # exactly the whole cluster: one 64-rank group
    assert [g.degree for g in one.plan.micro_batches[0].groups] == [64]


def test_all_busy_with_fewer_sequences_than_needed_groups():
    cm = tiny_cost_model(world=4)
    res = plan_step(cm, [5], DET)  # one short sequence must occupy all 4 ranks
    _check_feasible(cm, [5], res)
    assert res.plan.micro_batches[0].groups[0].degree == 4
    odd = tiny_cost_model(world=3)  # one sequence cannot occupy 3 ranks: documented idle fallback
    res = plan_step(odd, [5], DET)
    assert res.stats["all_busy"] is False
    _check_feasible(odd, [5], res, all_busy=False)
