"""The plan format: round trip, version, and validation of every feasibility rule."""

import pytest

from seqpar.scatter.plan import GroupPlan, MicroBatchPlan, Plan, PlanError


def _plan():
    return Plan(world=8, micro_batches=[
        MicroBatchPlan([GroupPlan(4, "hybrid", 0, (0,), 2, 2), GroupPlan(2, "ulysses", 4, (1, 2)), GroupPlan(1, "local", 6, (3,)),
                    GroupPlan(1, "local", 7, (4,))]),
        MicroBatchPlan([GroupPlan(8, "ring", 0, (5,))]),
    ], predicted_step_s=3.0, micro_batch_s=[2.0, 1.0])


LENGTHS = [300, 100, 90, 50, 60, 700]


def test_round_trip_and_validate():
    p = _plan()
    q = Plan.from_json(p.to_json())
    assert q == p and q.version == 1 and q.num_microbatches == 2
    q.validate(LENGTHS, capacity=100)
    assert q.groups_of_rank(5)[0].degree == 2 and q.groups_of_rank(5)[1].algorithm == "ring"
    assert p.micro_batches[0].groups[1].ulysses == 2 and p.micro_batches[1].groups[0].ring == 8


def test_unknown_version_is_refused():
    d = _plan().to_dict()
    d["version"] = 99
    with pytest.raises(PlanError, match="version 99 is not supported"):
        Plan.from_dict(d)


@pytest.mark.parametrize("mutate, message", [
    (lambda mbs: mbs[0].__setitem__(3, GroupPlan(1, "local", 7, (3,))), "appear"),                    # seq 3 twice, 4 never
    (lambda mbs: mbs[0].__setitem__(1, GroupPlan(2, "ulysses", 4, (1, 4))), "appear"),
    (lambda mbs: mbs[0].__setitem__(0, GroupPlan(4, "hybrid", 0, (0, 5), 2, 2)), "exceed"),           # over capacity
    (lambda mbs: mbs[0].__setitem__(1, GroupPlan(2, "ulysses", 5, (1, 2))), "consecutive"),          # misaligned
    (lambda mbs: mbs[0].pop(), "cover 7 ranks"),                                                     # rank 7 idle
    (lambda mbs: mbs[0].__setitem__(0, GroupPlan(3, "ring", 0, (0,))), "power of two"),
    (lambda mbs: mbs[0].__setitem__(2, GroupPlan(1, "local", 6, ())), "at least one sequence"),
    (lambda mbs: mbs[0].__setitem__(0, GroupPlan(4, "hybrid", 0, (0,), 4, 2)), "ulysses"),
])
def test_validation_rejects(mutate, message):
    p = _plan()
    mbs = [list(mb.groups) for mb in p.micro_batches]
    mutate(mbs)
    bad = Plan(world=8, micro_batches=[MicroBatchPlan(g) for g in mbs])
    with pytest.raises(PlanError, match=message):
        bad.validate(LENGTHS, capacity=100)


def test_idle_ranks_allowed_only_when_asked():
    p = Plan(world=8, micro_batches=[MicroBatchPlan([GroupPlan(4, "ulysses", 0, (0, 1, 2, 3, 4, 5))])])
    p.validate([10] * 6, capacity=100, all_busy=False)
    with pytest.raises(PlanError, match="cover 4 ranks"):
        p.validate([10] * 6, capacity=100)
    increasing = Plan(world=4, micro_batches=[MicroBatchPlan([GroupPlan(1, "local", 0, (0,)), GroupPlan(2, "ring", 1, (1,))])])
    with pytest.raises(PlanError):
        increasing.validate([10, 10], capacity=100, all_busy=False)
