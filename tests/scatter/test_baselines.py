"""Baselines: static degree with best-fit packing, batch-adaptive, greedy, and compare()."""

import pytest

from seqpar.hardware import load_profile
from seqpar.scatter.baselines import batch_adaptive, best_fit_pack, compare, static_best, static_plan
from seqpar.scatter.costmodel import build_cost_model
from seqpar.scatter.planner import PlannerOptions
from seqpar.scatter.workloads import resolve_model, synthetic_lengths


@pytest.fixture(scope="module")
def cm():
    return build_cost_model(load_profile("A100-40GB"), resolve_model("gpt-7b"), 32)


def test_best_fit_packing():
    packs = best_fit_pack([70, 50, 40, 30, 10], list(range(5)), 100)
    assert sorted(sorted(p) for p in packs) == [[0, 3], [1, 2, 4]]


def test_static_plans_are_feasible_and_too_small_degrees_refused(cm):
    lengths = synthetic_lengths("github", 80, seed=5, max_len=8 * cm.capacity)
    assert static_plan(cm, lengths, 4) is None  # the longest needs 8 ranks
    for d in (8, 16, 32):
        t, plan = static_plan(cm, lengths, d)
        plan.validate(lengths, cm.capacity, all_busy=False)
        assert all(g.degree == d for mb in plan.micro_batches for g in mb.groups)
        assert t == pytest.approx(sum(plan.micro_batch_s))


def test_batch_adaptive_never_worse_than_one_static_degree(cm):
    batches = [synthetic_lengths("wikipedia", 40, seed=s, max_len=16 * cm.capacity) for s in range(3)]
    st = static_best(cm, batches)
    ba = batch_adaptive(cm, batches)
    assert ba["predicted_step_s"] <= st["predicted_step_s"] + 1e-9
    assert static_best(cm, batches[:1])["predicted_step_s"] == pytest.approx(batch_adaptive(cm, batches[:1])["predicted_step_s"])


def test_compare_reports_speedups_against_the_same_bound(cm):
    batches = [synthetic_lengths("commoncrawl", 64, seed=s, max_len=16 * cm.capacity) for s in range(2)]
    r = compare(cm, batches, PlannerOptions(time_limit_s=None))  # no clock: the planner's plan is reproducible
    assert r["lower_bound_s"] <= r["predicted_step_s"]
    for name in ("static_best", "batch_adaptive", "greedy"):
        b = r["baselines"][name]
        assert b["speedup"] == pytest.approx(b["predicted_step_s"] / r["predicted_step_s"])
        assert b["predicted_step_s"] >= r["lower_bound_s"] - 1e-9
    assert r["baselines"]["greedy"]["speedup"] >= 1.0 - 1e-12
