"""Checkpoints, resume and failure behaviour: kills, preemption signals, NaN, resharding."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from seqpar.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _overrides(store, run_dir, steps=6, interval=2):
    return [
        f"data.path={store}",
        "data.seq_len=128",
        "data.tokens_per_step=512",
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        f"checkpoint.interval={interval}",
        "checkpoint.keep_latest=2",
        "logging.progress=false",
        "parallel.sp=1",  # data parallel: tiny-cpu.yaml itself runs sp=2
        "parallel.ring=1",
        f"run.output_dir={run_dir}",
    ]


def _launch(overrides, nproc=1, env=None):
    """Start a run as a user would: one process, or torchrun for several."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "seqpar.train", "--config", "configs/tiny-cpu.yaml", *overrides]
    else:
        cmd = [sys.executable, "-m", "seqpar.launcher", "train", "configs/tiny-cpu.yaml", *overrides, "--nproc", str(nproc)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(overrides, nproc=1, env=None, timeout=600):
    p = _launch(overrides, nproc, env)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _checkpoints(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def uninterrupted(small_store, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    rc, out, err = _run(_overrides(small_store, run_dir))
    assert rc == 0, err
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert _checkpoints(run_dir) == ["step_000004", "step_000006"]  # keep_latest=2
    return losses


def test_sigkill_after_checkpoint_resumes_same_curve(small_store, tmp_path, uninterrupted):
    run_dir = str(tmp_path / "run")
    rc, _, _ = _run(_overrides(small_store, run_dir), env={"SEQPAR_FAULT_KILL_AFTER_SAVE": "4"})
    assert rc == -signal.SIGKILL
    assert _checkpoints(run_dir)[-1] == "step_000004"
    rc, out, err = _run(_overrides(small_store, run_dir))  # the same command again
    assert rc == 0, err
    assert "resumed from" in out and "step_000004" in out
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # no duplicated steps in metrics.jsonl
    for step in (5, 6):
        assert losses[step] == pytest.approx(uninterrupted[step], rel=1e-6)


def test_kill_while_writing_checkpoint_resumes_from_previous(small_store, tmp_path, uninterrupted):
    run_dir = str(tmp_path / "run")
    rc, _, _ = _run(_overrides(small_store, run_dir), env={"SEQPAR_FAULT_KILL_MID_SAVE": "4"})
    assert rc == -signal.SIGKILL
    assert _checkpoints(run_dir) == [".tmp-step_000004", "step_000002"]  # the partial one is not a checkpoint
    rc, out, err = _run(_overrides(small_store, run_dir))
    assert rc == 0, err
    assert "resumed from" in out and "step_000002" in out
    assert ".tmp-step_000004" not in _checkpoints(run_dir)
    losses = _losses(run_dir)
    for step in (3, 4, 5, 6):
        assert losses[step] == pytest.approx(uninterrupted[step], rel=1e-6)


def _train(overrides):
    from seqpar.train.trainer import train

    return [(r["step"], r["loss"]) for r in train(load_config(None, overrides))]


def test_checkpoint_from_dp2_resumes_on_dp1(dist_pool, small_store, tmp_path):
    # Constant learning rate, so "4 steps, then resume to 6" is the same schedule as 6 steps in one go.
    const = ["train.warmup_steps=0", "train.min_lr_ratio=1.0"]
    run_dir = str(tmp_path / "resharded")
    dist_pool(2).run(_train, _overrides(small_store, run_dir, steps=4) + const + ["parallel.fsdp=true"])
    resumed = dist_pool(1).run(_train, _overrides(small_store, run_dir, steps=6) + const + ["parallel.fsdp=false"])[0]
    straight = dist_pool(1).run(_train, _overrides(small_store, str(tmp_path / "straight"), steps=6) + const)[0]
    assert [s for s, _ in resumed] == [5, 6]
    for (_, loss), (_, ref) in zip(resumed, straight[4:]):
        assert loss == pytest.approx(ref, rel=1e-5)
    # A fresh start would be far off: the loss at step 5 is well below the loss at step 1.
    assert resumed[0][1] < straight[0][1] - 0.05


def test_nan_stops_with_step_rank_and_checkpoint(dist_pool, small_store, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    rc, out, err = _run(
        _overrides(small_store, run_dir, interval=1), nproc=2, env={"SEQPAR_FAULT_NAN_STEP": "3", "SEQPAR_FAULT_RANK": "1"}
    )
    assert rc != 0
    assert "non-finite loss at step 3 on rank 1" in err
    assert "last good checkpoint: " in err and "step_000002" in err
    assert "step_000003" not in _checkpoints(run_dir)


def test_stalled_rank_times_out_with_step_and_checkpoint_then_resumes(small_store, tmp_path, uninterrupted):
    """Rank 1 stalls at step 3: rank 0's collective gives up after parallel.timeout_s with a one-line error
    naming the step and the last checkpoint; rerunning the command resumes onto the same curve."""
    run_dir = str(tmp_path / "run")
    # 45 s: the limit covers every collective of the run, not only the stall: the rendezvous, start-up
    # skew between ranks and the barrier while rank 0 fsyncs checkpoint 2 on a busy machine must
    # never trip it. The resumed run keeps the default limit.
    overrides = _overrides(small_store, run_dir)
    # The stalled rank sleeps 600 s unless stopped: _run's 600-s limit fails the test if it is not.
    rc, out, err = _run(overrides + ["parallel.timeout_s=45"], nproc=2,
                        env={"SEQPAR_FAULT_HANG_STEP": "3", "SEQPAR_FAULT_RANK": "1"})
    assert rc != 0
    assert "rank 0: a collective timed out at step 3 after parallel.timeout_s=45 s" in err, err[-3000:]
    assert "last checkpoint: " in err and "step_000002" in err
    assert _checkpoints(run_dir) == ["step_000002"]
    rc, out, err = _run(overrides, nproc=2)
    assert rc == 0, err[-3000:]
    resumed = _losses(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(3, 7):  # dp=2 equals one process (tests/train/test_data_parallel.py)
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4), step


def test_nan_skip_option(small_store, tmp_path):
    run_dir = str(tmp_path / "run")
    rc, out, err = _run(
        _overrides(small_store, run_dir, steps=3, interval=0) + ["train.on_nan=skip"], env={"SEQPAR_FAULT_NAN_STEP": "2"}
    )
    assert rc == 0, err
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        skipped = [r["skipped"] for r in map(json.loads, f)]
    assert skipped == [False, True, False]


def _wait_for_steps(run_dir, n, proc, timeout=600):
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("run made no progress")


def test_sigterm_checkpoints_and_exits_zero(small_store, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _launch(_overrides(small_store, run_dir, steps=10_000, interval=0))
    _wait_for_steps(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = _assert_stopped_with_checkpoint(proc, run_dir)
    assert "SIGTERM received" in out


def _assert_stopped_with_checkpoint(proc, run_dir):
    """The run exits 0 and its only checkpoint is the last step it logged."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    last = max(_losses(run_dir))
    assert _checkpoints(run_dir) == [f"step_{last:06d}"]
    return out


def _child_with_rank(parent_pid, rank):
    for task in os.listdir(f"/proc/{parent_pid}/task"):
        with open(f"/proc/{parent_pid}/task/{task}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/environ", "rb") as e:
                    if f"RANK={rank}".encode() in e.read().split(b"\0"):
                        return int(pid)
    return None


def test_sigusr1_on_one_rank_stops_all_ranks_together(small_store, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _launch(_overrides(small_store, run_dir, steps=10_000, interval=0), nproc=2)
    _wait_for_steps(run_dir, 2, proc)
    # The launcher runs torchrun, whose children are the ranks.
    torchrun = int(open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()[0])
    rank1 = _child_with_rank(torchrun, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGUSR1)
    _assert_stopped_with_checkpoint(proc, run_dir)


def test_sigterm_to_the_launcher_checkpoints_all_ranks_and_exits_zero(small_store, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _launch(_overrides(small_store, run_dir, steps=10_000, interval=0), nproc=2)
    _wait_for_steps(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)  # what Slurm or a user's kill sends to the job's main process
    _assert_stopped_with_checkpoint(proc, run_dir)


def test_resume_false_refuses_to_overwrite_and_bad_checkpoint_is_one_line(small_store, tmp_path):
    run_dir = str(tmp_path / "run")
    rc, _, err = _run(_overrides(small_store, run_dir, steps=2, interval=0))
    assert rc == 0, err
    rc, _, err = _run(_overrides(small_store, run_dir, steps=2) + ["checkpoint.resume=false"])
    assert rc == 2 and "already holds checkpoints" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = _run(_overrides(small_store, run_dir, steps=4) + ["model.dim=64"])
    assert rc == 3 and "does not fit this run" in err and len(err.strip().splitlines()) == 1, err
