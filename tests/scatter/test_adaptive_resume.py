"""A killed adaptive run resumes on the uninterrupted run's loss curve (the real planner process).

Plans come from a planner under a wall-clock limit, so the two runs may run different plans; the
loss does not depend on the plan beyond float rounding (every plan gives the single-device result),
so the curves are compared at rel 1e-4, the tolerance of the exactness tests.
"""

import signal

import pytest

from tests.train.test_resume import _checkpoints, _losses, _run


def _overrides(store, run_dir):
    return [
        f"data.path={store}", "data.mode=varlen", "data.seq_len=128", "data.tokens_per_step=512",
        "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "train.steps=6", "train.warmup_steps=1", "checkpoint.interval=2", "logging.progress=false",
        "parallel.algorithm=adaptive", "parallel.dp=1",
        "scatter.capacity_tokens=96",  # pieces of 97-128 tokens need a group of 2: mixed degrees
        "scatter.time_limit_s=0.5", f"run.output_dir={run_dir}",
    ]


def test_sigkill_after_checkpoint_resumes_adaptive_curve(small_store, tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    rc, out, err = _run(_overrides(small_store, ref_dir), nproc=2)
    assert rc == 0, err
    ref = _losses(ref_dir)
    assert "plan 2" in out or "plan 1+1" in out  # the step line shows the plan's degrees
    rc, _, _ = _run(_overrides(small_store, run_dir), nproc=2, env={"SEQPAR_FAULT_KILL_AFTER_SAVE": "4"})
    assert rc == -signal.SIGKILL or rc != 0
    assert _checkpoints(run_dir)[-1] == "step_000004"
    rc, out, err = _run(_overrides(small_store, run_dir), nproc=2)  # the same command again
    assert rc == 0, err
    assert "resumed from" in out
    got = _losses(run_dir)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
