"""The level-MILP lower bound: never above the brute-force optimum, strictly tighter where
power-of-two groups make long sequences indivisible."""

import numpy as np
import pytest

from seqpar.scatter.bound import _slopes, level_bound
from seqpar.scatter.costmodel import CostTable
from seqpar.scatter.planner import PlannerOptions, lower_bound, plan_step, step_lower_bound
from tests.scatter.tiny import brute_force, random_instances, tiny_cost_model

# Tiny instances are solved without a clock and to gap 0, so every bound here depends only on
# the instance, never on how busy the machine is; comparisons between two bounds still allow
# the gap HiGHS reports (0 unless it stops early) and its 1e-6 feasibility tolerance.
EXACT = {"time_limit_s": None, "mip_rel_gap": 0.0}


def _solved(info: dict) -> float:
    """The relative slack to allow when comparing this bound with another: HiGHS's final gap
    plus its feasibility tolerance (the MILP must have been solved, not stopped)."""
    assert info["status"] == "Optimal", info
    return info["mip_gap"] + 1e-6


def test_level_bound_below_brute_force_and_often_tighter():
    tighter = 0
    for cm, lengths in random_instances(7, ((4, 12, 5), (3, 8, 5), (2, 8, 6))):
        opt = brute_force(cm, lengths, all_busy=False)
        old = lower_bound(cm, lengths)
        for kw in ({}, {"singles": 0, "ratio": 1.5}, {"singles": 1, "ratio": 3.0, "grid": 2}):
            new, info = level_bound(cm, lengths, **kw, **EXACT)
            assert new <= opt + 1e-12, (cm.world, lengths, kw, new, opt, info)
        new, info = level_bound(cm, lengths, **EXACT)
        tighter += new > old * (1 + _solved(info)) + 1e-6
    assert tighter >= 5, tighter  # the MILP must actually add something on tiny instances


def test_token_tracking_never_loosens_and_tightens_wide_buckets():
    """With every bucket wide (no singles, max/min length 3), pricing members at the bucket's
    least length and cost is loose; tracking tokens (y) must stay below brute force and raise
    the bound on some instances."""
    raised = 0
    for cm, lengths in random_instances(11, ((4, 10, 6), (2, 8, 6))):
        opt = brute_force(cm, lengths, all_busy=False)
        kw = {"singles": 0, "ratio": 3.0}
        plain, pinfo = level_bound(cm, lengths, tokens=False, **kw, **EXACT)
        tracked, info = level_bound(cm, lengths, **kw, **EXACT)
        # Both are optima of their models (gap 0), and tracking only adds constraints.
        slack = (_solved(pinfo) + _solved(info)) * plain
        assert plain - slack <= tracked <= opt + 1e-12, (cm.world, lengths, plain, tracked, opt, info)
        raised += tracked > plain + slack
    assert raised >= 2, raised


def test_slopes_give_a_line_below_every_member():
    from seqpar.hardware import load_profile
    from seqpar.scatter.costmodel import build_cost_model
    from seqpar.scatter.workloads import resolve_model

    cm = build_cost_model(load_profile("A100-40GB"), resolve_model("gpt-7b"), 64)
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(64, 190_000, size=200))
    tab = CostTable(cm, lengths)
    for lo in range(0, 200, 25):
        ids = list(range(lo, lo + 25))
        for d in tab.degrees:
            k = _slopes(tab, ids, d)
            c = tab.best[d][ids]
            ok = np.isfinite(c)
            line = c[ok].min() + k * (lengths[ids][ok] - lengths[ids][ok].min()) / cm.capacity
            assert np.all(c[ok] >= line - 1e-12), (lo, d)
            if ok.sum() > 1:  # it touches the shortest member and another: no higher line holds
                assert np.isclose(c[ok] - line, 0.0, rtol=0, atol=1e-9).sum() >= 2, (lo, d)


def test_two_sequences_needing_two_ranks_on_three_ranks():
    # K = 100, R = 3: a 150-token sequence needs a 2-rank group and only one fits beside the
    # idle rank, so two of them need two micro-batches: optimum = 2 T*. The closed-form bounds
    # see 300 tokens <= R K (one micro-batch) and give well under 2 T*.
    cm = tiny_cost_model(world=3)
    lengths = [150, 150]
    t_star = cm.group_const(2) + cm.best_seq_cost(150, 2)[0]
    opt = brute_force(cm, lengths, all_busy=False)
    assert opt == pytest.approx(2 * t_star)
    old = lower_bound(cm, lengths)
    new, info = level_bound(cm, lengths, **EXACT)
    assert info["status"] == "Optimal"
    assert old < 0.8 * opt
    assert new == pytest.approx(opt, rel=1e-5) and new <= opt + 1e-12


@pytest.mark.parametrize("world, lengths", [(4, [135, 230, 61, 345]), (3, [22, 103, 126, 153]),
                                            (2, [6, 186, 144, 63])])
def test_found_instances_strictly_tighter(world, lengths):
    cm = tiny_cost_model(world=world)
    opt = brute_force(cm, lengths, all_busy=False)
    old = lower_bound(cm, lengths)
    new, info = level_bound(cm, lengths, **EXACT)
    assert info["status"] == "Optimal"
    assert old + 0.02 < new <= opt + 1e-12, (old, new, opt)


def test_planner_reports_max_of_both_bounds_and_bound_time():
    cm = tiny_cost_model(world=3)
    # No clocks: the plan and both bounds depend only on the instance.
    res = plan_step(cm, [150, 150], PlannerOptions(time_limit_s=None, bound_time_s=None))
    assert res.stats["bound_method"] == "level-milp" and res.stats["bound_s"] >= 0.0
    assert res.lower_bound_s == pytest.approx(step_lower_bound(cm, [150, 150], time_limit_s=None)[0])
    assert res.lower_bound_s > lower_bound(cm, [150, 150]) and res.gap >= -1e-9
    off = plan_step(cm, [150, 150], PlannerOptions(time_limit_s=None, bound_time_s=0.0))
    assert off.stats["bound_method"] == "closed-form"
    assert off.lower_bound_s == pytest.approx(lower_bound(cm, [150, 150]))
