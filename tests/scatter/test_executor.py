"""The executor's pieces: algorithm checks, plan sources (process, inline, static), the run's cost
model and its errors, and the plan broadcast's validation on ranks."""

import dataclasses

import numpy as np
import pytest

from seqpar.config import ConfigError, load_config
from seqpar.scatter.costmodel import CostModelError
from seqpar.scatter.executor import check_algorithms
from seqpar.scatter.plan import GroupPlan, MicroBatchPlan, Plan, PlanError
from seqpar.scatter.plan_source import InlinePlanner, PlannerProcess, StaticPlans
from seqpar.scatter.planner import PlannerOptions
from tests.scatter.tiny import tiny_cost_model


def _plan(*groups, world=4):
    return Plan(world=world, micro_batches=[MicroBatchPlan(tuple(groups))])


def test_check_algorithms_names_the_group():
    check_algorithms(_plan(GroupPlan(2, "ring", 0, (0,)), GroupPlan(1, "local", 2, (1,)), GroupPlan(1, "local", 3, (2,))))
    check_algorithms(_plan(GroupPlan(4, "hybrid", 0, (0,), 2, 2)))
    with pytest.raises(PlanError, match=r"micro-batch 0 group 1 \(degree 2, first rank 2\): algorithm 'local'"):
        check_algorithms(_plan(GroupPlan(2, "ring", 0, (0,)), GroupPlan(2, "local", 2, (1,), 2, 1)))
    with pytest.raises(PlanError, match="algorithm 'hybrid' does not fit ulysses 4 x ring 1"):
        check_algorithms(_plan(GroupPlan(4, "hybrid", 0, (0,), 4, 1)))


def test_allowed_algorithms_and_the_ulysses_head_rule():
    cm = dataclasses.replace(tiny_cost_model(world=8, capacity=100), n_heads=4, n_kv_heads=2)
    assert cm.algorithms(4) == ["ulysses", "ring", "hybrid"]
    assert "ulysses" not in cm.algorithms(8)  # 8 ranks cannot split 4 heads
    assert dataclasses.replace(cm, allowed=("ring",)).algorithms(4) == ["ring"]
    only_ulysses = dataclasses.replace(cm, allowed=("ulysses",))
    assert only_ulysses.max_degree == 4  # no algorithm at 8
    gqa = dataclasses.replace(cm, n_heads=6, n_kv_heads=3)
    assert "ulysses" not in gqa.algorithms(2)  # 6 heads split, but 3 KV heads neither split nor replicate over 2
    with pytest.raises(CostModelError, match="hybrid alone"):
        dataclasses.replace(cm, allowed=("hybrid",))


def test_planner_process_gives_the_inline_plan():
    """Deterministic options: the child process and the calling thread plan the same steps alike."""
    cm = tiny_cost_model(world=4, capacity=100)
    opts = PlannerOptions(time_limit_s=None, bound_time_s=0)
    batches = [np.array([150, 40, 30, 90, 20, 10]), np.array([300, 5, 60])]
    proc, inline = PlannerProcess(cm, opts), InlinePlanner(cm, opts)
    try:
        for step, lengths in enumerate(batches):  # requested ahead, collected in order
            proc.request(step, lengths)
        for step, lengths in enumerate(batches):
            inline.request(step, lengths)
            got, want = proc.result(step), inline.result(step)
            assert got.error == "" and got.plan_json == want.plan_json
            Plan.from_json(got.plan_json).validate(lengths, cm.capacity)
        proc.request(2, np.array([10_000]))  # longer than 4 ranks x K: an error, not a crash
        assert "10000 tokens" in proc.result(2).error
    finally:
        proc.close()
    with pytest.raises(RuntimeError, match="not requested next"):
        proc.result(7)


def test_planner_process_outlives_stop_signals():
    """A stop request (SIGUSR1 from `seqpar train`, SIGUSR2 / SIGTERM from Slurm, Ctrl-C) reaches every
    process of the job; the planner must keep answering while its rank checkpoints."""
    import os
    import signal

    cm = tiny_cost_model(world=4, capacity=100)
    proc = PlannerProcess(cm, PlannerOptions(time_limit_s=None, bound_time_s=0))
    try:
        proc.request(0, np.array([150, 40]))
        assert proc.result(0).error == ""  # the child is in its loop: its signal dispositions are set
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            os.kill(proc._proc.pid, sig)
        proc.request(1, np.array([90, 20, 10]))
        assert proc.result(1).error == "" and proc._proc.poll() is None
    finally:
        proc.close()
    assert proc._proc.returncode == 0  # it still ends at "exit" / EOF


def test_static_plans_are_one_degree():
    cm = tiny_cost_model(world=4, capacity=100)
    src = StaticPlans(cm, 2)
    src.request(0, np.array([150, 40, 30, 90, 20]))
    plan = Plan.from_json(src.result(0).plan_json)
    assert {g.degree for mb in plan.micro_batches for g in mb.groups} == {2}
    src.request(1, np.array([350]))
    assert "static_degree=2 cannot hold" in src.result(1).error


def _cfg(extra):
    return load_config("configs/tiny-cpu.yaml", ["parallel.algorithm=adaptive", "data.mode=varlen", *extra])


def test_adaptive_config_errors():
    with pytest.raises(ConfigError, match="parallel.algorithm=adaptive .* needs parallel.dp=1, got parallel.dp=2"):
        _cfg(["parallel.dp=2"])
    with pytest.raises(ConfigError, match="needs data.mode=varlen, got data.mode=pack"):
        load_config("configs/tiny-cpu.yaml", ["parallel.algorithm=adaptive"])
    with pytest.raises(ConfigError, match="scatter.algorithms='rign' is not allowed"):
        _cfg(["scatter.algorithms=ulysses,rign"])
    with pytest.raises(ConfigError, match="scatter.static_degree=3"):
        _cfg(["scatter.static_degree=3"])
    cfg = _cfg(["parallel.dp=1", "scatter.algorithms=ring, ring,ulysses"])
    assert cfg.scatter.algorithm_list == ("ring", "ulysses")
    assert cfg.parallel_dims(6).describe() == "world 6 = dp 1 x sp 6 (ulysses 1 x ring 6)"


def test_sequence_longer_than_the_pool_is_a_config_error():
    import torch

    from seqpar.scatter.capacity import run_cost_model

    cfg = _cfg(["data.seq_len=512", "scatter.capacity_tokens=100", "scatter.profile=cpu", "model.vocab_size=256"])
    with pytest.raises(ConfigError, match=r"data.seq_len=512 is longer than the pool can hold: 4 ranks x capacity 100"):
        run_cost_model(cfg, 4, torch.device("cpu"))
    cm, notes = run_cost_model(cfg, 8, torch.device("cpu"))  # 8 ranks x 100 >= 512
    assert cm.capacity == 100 and notes["capacity_from"] == "scatter.capacity_tokens"
    with pytest.raises(ConfigError, match="scatter.profile='nope'"):
        run_cost_model(_cfg(["scatter.profile=nope"]), 4, torch.device("cpu"))


def _bad_plan_case(kind):
    """On every rank of a 2-rank pool: rank 0's source returns a broken plan; every rank raises."""
    import torch
    import torch.distributed as dist

    from seqpar.data.varlen import VarlenSteps
    from seqpar.parallel.pool import GroupPool, adaptive_shapes
    from seqpar.scatter.executor import AdaptiveExecutor, ExecutorError
    from seqpar.scatter.plan_source import ForcedPlans

    store = kind[1]
    steps = VarlenSteps(store, seq_len=64, tokens_per_step=256, seed=0)
    n = steps.step_lengths(0).size
    bad = {
        "missing": lambda step, lengths: _plan(GroupPlan(2, "ring", 0, tuple(range(n - 1))), world=2),
        "capacity": lambda step, lengths: _plan(GroupPlan(1, "local", 0, tuple(range(n - 1))),
                                                GroupPlan(1, "local", 1, (n - 1,)), world=2),
        "algorithm": lambda step, lengths: _plan(GroupPlan(2, "local", 0, tuple(range(n)), 2, 1), world=2),
    }[kind[0]]
    pool = _bad_plan_case.pool = getattr(_bad_plan_case, "pool", None) or GroupPool.build(adaptive_shapes(2))
    src = ForcedPlans(bad) if dist.get_rank() == 0 else None
    ex = AdaptiveExecutor(steps, 150, pool, dist.group.WORLD, torch.device("cpu"), src, 5)
    ex.request(0)
    try:
        ex.plan(0)
    except ExecutorError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("kind,match", [
    ("missing", r"the plan of step 1 does not validate: sequences \[\d+\] appear \[0\] times"),
    ("capacity", r"the plan of step 1 does not validate: micro-batch 0 group 0 \(degree 1, first rank 0\): \d+ tokens exceed 1 x capacity 150"),
    ("algorithm", r"micro-batch 0 group 0 \(degree 2, first rank 0\): algorithm 'local'"),
])
def test_a_plan_that_does_not_validate_fails_on_every_rank(dist_pool, small_store, kind, match):
    import re

    for msg in dist_pool(2).run(_bad_plan_case, (kind, small_store)):
        assert re.search(match, msg), msg
        assert "\n" not in msg
