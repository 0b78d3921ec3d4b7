"""`seqpar submit`: the batch script (pure), and on a real one-node Slurm cluster (`.ci/slurm.sh up`,
which CI runs) training in both modes and a preemption with requeue, each equal to `seqpar train`."""

import json
import os
import subprocess
import time

import pytest

from seqpar.launcher.slurm import SubmitOptions, parse_env, parse_job_id, render_sbatch, signal_lead, time_seconds
from tests.launcher.test_cli import REPO, seqpar

TEMPLATE = open(os.path.join(REPO, "cluster", "slurm", "train.sbatch")).read()
OPTS = SubmitOptions(config="/runs/a/slurm/config.yaml", run_dir="/runs/a", nodes=2, nproc_per_node=4, gpus_per_node=4,
                     time="1-00:00:00", workdir="/repo", python="/venv/bin/python", partition="gpu", account="proj")

CLUSTER = os.environ.get("SEQPAR_SLURM_TESTS") == "required"
needs_cluster = pytest.mark.skipif(not CLUSTER, reason="needs the one-node Slurm cluster of `source .ci/slurm.sh up` "
                                                       "(it sets SEQPAR_SLURM_TESTS=required; CI does)")


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("1-12", 129600),
                                           ("1-00:30", 88200), ("2-01:02:03", 176523)])
def test_slurm_time_formats(value, seconds):
    assert time_seconds(value) == seconds


@pytest.mark.parametrize("value", ["1h", "", "10m", "1:2:3:4", "0", "-5", "1-"])
def test_bad_slurm_time_is_one_line(value):
    with pytest.raises(ValueError, match="is not a Slurm time|longer than zero") as e:
        time_seconds(value)
    assert "\n" not in str(e.value)


def test_signal_lead_leaves_room_for_a_checkpoint():
    assert signal_lead(600) == 120 and signal_lead(86400) == 300 and signal_lead(60) == 30


def test_srun_script():
    script = render_sbatch(OPTS, TEMPLATE)
    assert "{{" not in script
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --signal=USR2@300", "#SBATCH --output=/runs/a/slurm/slurm-%j.out", "#SBATCH --chdir=/repo",
                 "srun --kill-on-bad-exit=1 --label --ntasks-per-node=4 /venv/bin/python -m seqpar.train "
                 "--config /runs/a/slurm/config.yaml"):
        assert line in script.splitlines(), line
    assert "--qos" not in script and "--cpus-per-task" not in script
    assert 'if [[ $status == preempted ]]' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_torchrun_script_runs_one_task_per_node_with_c10d():
    from dataclasses import replace

    script = render_sbatch(replace(OPTS, mode="torchrun", gpus_per_node=0, sbatch_args=("--exclusive",),
                                   env=(("NCCL_DEBUG", "WARN"),), setup="module load cuda"), TEMPLATE)
    lines = script.splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --cpus-per-task=4" in lines and "#SBATCH --exclusive" in lines
    assert "--gpus-per-node" not in script  # a CPU cluster rejects any GPU request
    assert "export NCCL_DEBUG=WARN" in lines and "module load cuda" in lines
    launch = next(ln for ln in lines if ln.startswith("srun "))
    assert "-m seqpar.launcher train /runs/a/slurm/config.yaml --nproc 4 --nnodes 2" in launch
    assert '--rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$SLURM_JOB_ID"' in launch


@pytest.mark.parametrize("change,match", [
    ({"nodes": 0}, "--nodes 0 must be >= 1"),
    ({"nproc_per_node": 0}, "--nproc-per-node 0 must be >= 1"),
    ({"gpus_per_node": -1}, "--gpus-per-node -1 must be >= 0"),
    ({"mode": "mpirun"}, "--mode 'mpirun' must be one of srun, torchrun"),
    ({"max_requeues": -1}, "--max-requeues -1"),
    ({"time": "1h"}, "--time '1h' is not a Slurm time"),
    ({"env": (("1X", "y"),)}, "--env '1X' is not a variable name"),
    ({"run_dir": "runs/a"}, "'runs/a' must be an absolute path"),
])
def test_bad_options_are_one_line(change, match):
    from dataclasses import replace

    with pytest.raises(ValueError, match=match):
        render_sbatch(replace(OPTS, **change), TEMPLATE)


def test_parsers():
    assert parse_job_id("123\n") == 123 and parse_job_id("77;cluster2") == 77
    with pytest.raises(ValueError, match="not a job id"):
        parse_job_id("sbatch: error: Batch job submission failed")
    assert parse_env(["A=1", "B=x=y"]) == (("A", "1"), ("B", "x=y"))
    with pytest.raises(ValueError, match="--env 'A' must look like NAME=VALUE"):
        parse_env(["A"])


def test_job_state_tells_a_forgotten_job_from_an_unanswered_query(monkeypatch):
    from seqpar.launcher import submit_cmd

    replies = iter([subprocess.TimeoutExpired("scontrol", 60),
                    subprocess.CompletedProcess([], 1, "", "slurm_load_jobs error: Socket timed out on send/recv operation"),
                    subprocess.CompletedProcess([], 0, "JobId=7 JobName=seqpar JobState=PENDING Reason=BeginTime", ""),
                    subprocess.CompletedProcess([], 1, "", "slurm_load_jobs error: Invalid job id specified")])

    def fake_run(*args, **kwargs):
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(submit_cmd.subprocess, "run", fake_run)
    assert [submit_cmd.job_state(7) for _ in range(4)] == [None, None, "PENDING", ""]


def test_wait_for_keeps_waiting_through_unanswered_queries(monkeypatch, tmp_path, capsys):
    from seqpar.launcher import submit_cmd

    (tmp_path / "status.json").write_text(json.dumps({"status": "done"}))
    states = iter([None, "PENDING", None, None, "RUNNING", "COMPLETED"])
    monkeypatch.setattr(submit_cmd, "job_state", lambda job_id: next(states))
    assert submit_cmd.wait_for(7, str(tmp_path), poll_s=0, max_unanswered=3) == 0
    assert "job 7 ended COMPLETED; run status done" in capsys.readouterr().out
    monkeypatch.setattr(submit_cmd, "job_state", lambda job_id: None)
    assert submit_cmd.wait_for(7, str(tmp_path), poll_s=0, max_unanswered=3) == 1
    assert "scontrol gave no answer 3 times in a row" in capsys.readouterr().out


def test_print_script_writes_nothing(tmp_path):
    p = seqpar("submit", "configs/tiny-cpu.yaml", "--nproc-per-node", "2", "--gpus-per-node", "0", "--time", "10",
               "--print-script", f"run.output_dir={tmp_path}/run")
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --ntasks-per-node=2" in p.stdout and not (tmp_path / "run").exists()


def test_submit_checks_the_layout_before_queueing(tmp_path):
    p = seqpar("submit", "configs/tiny-cpu.yaml", "--nproc-per-node", "3", "--gpus-per-node", "0", "--time", "10",
               f"run.output_dir={tmp_path}/run")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "sp" in lines[0], p.stderr
    assert not (tmp_path / "run").exists()


# -- on the cluster ------------------------------------------------------------------------------

RUN = ["configs/tiny-cpu.yaml", "train.steps=6", "checkpoint.interval=2", "data.seq_len=256", "data.tokens_per_step=1024"]


def _losses(run_dir) -> list[float]:
    return [json.loads(ln)["loss"] for ln in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_store):
    """The same run under `seqpar train --nproc 2` (torchrun); only the cluster tests use it."""
    run = tmp_path_factory.mktemp("ref") / "run"
    p = seqpar("train", *RUN, f"data.path={small_store}", f"run.output_dir={run}", "--nproc", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    return _losses(run)


def _submit(run_dir, small_store, *extra):
    return seqpar("submit", *RUN, f"data.path={small_store}", f"run.output_dir={run_dir}", "--nodes", "1",
                  "--nproc-per-node", "2", "--gpus-per-node", "0", "--time", "10", *extra, timeout=900)


def _job_id(run_dir) -> int:
    with open(os.path.join(run_dir, "slurm", "jobs.jsonl")) as f:
        return json.loads(f.readlines()[-1])["job_id"]


def _scontrol(job_id: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)


def _daemon_logs(lines: int = 40) -> str:
    """The tails of the test cluster's slurmctld and slurmd logs, for a failure message."""
    out = []
    for name in ("slurmctld.log", "slurmd.log"):
        path = os.path.join(os.environ.get("SEQPAR_SLURM_DIR", ""), "log", name)
        if os.path.exists(path):
            out.append(f"\n--- {name} (last {lines} lines)\n" + "".join(open(path).readlines()[-lines:]))
    return "".join(out)


def _until(what, predicate, timeout_s=300.0):
    """Poll ``predicate`` (no timing assumption but a generous hang guard)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}" + _daemon_logs())


@needs_cluster
@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_submit_trains_like_seqpar_train(tmp_path, small_store, reference, mode):
    run = tmp_path / "run"
    p = _submit(run, small_store, "--mode", mode, "--wait")
    log = open(run / "slurm" / f"slurm-{_job_id(run)}.out").read() if (run / "slurm" / "jobs.jsonl").exists() else ""
    assert p.returncode == 0, p.stdout + p.stderr + log + _daemon_logs()
    assert f"({mode} mode, 1 x 2 ranks)" in p.stdout and "ended COMPLETED; run status done" in p.stdout
    assert (f"launcher {'slurm' if mode == 'srun' else 'torchrun'}") in log
    assert _losses(run) == pytest.approx(reference, rel=1e-6)
    slurm = run / "slurm"
    assert {"config.yaml", "train.sbatch", "jobs.jsonl"} <= set(os.listdir(slurm))
    dump = open(slurm / f"env-{_job_id(run)}-restart0.txt").read()
    assert "SLURM_JOB_ID=" in dump and "torch " in dump and "# scontrol show job" in dump and "JobState=RUNNING" in dump
    assert "SLURM_RESTART_COUNT" not in dump  # absent on the first run
    assert json.loads((run / "status.json").read_text())["status"] == "done"


@needs_cluster
def test_preempted_job_checkpoints_requeues_and_resumes_on_the_same_curve(tmp_path, small_store, reference):
    run = tmp_path / "run"
    # rank 0 stalls at step 5 (after checkpoint 4) until asked to stop: the signal lands mid-run, every time
    p = _submit(run, small_store, "--env", "SEQPAR_FAULT_HANG_STEP=5")
    assert p.returncode == 0, p.stdout + p.stderr
    job = _job_id(run)
    _until("checkpoint 4", lambda: (run / "checkpoints" / "step_000004").is_dir())
    subprocess.run(["scancel", "--signal=USR2", str(job)], check=True)
    # the job checkpoints step 5, exits, says "preempted" and requeues itself: Slurm holds it back a while
    state = _until("the requeue", lambda: (s := _scontrol(job)).get("Restarts") == "1" and s["JobState"] == "PENDING" and s)
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"
    # Not StartTime=now: slurmd refuses a launch credential created in the same second as the requeue
    # revoked the old one (its `ctime <= revoked` check; Slurm's own requeue delay avoids that), and
    # the job then ends FAILED without running. The requeue happened before we saw PENDING, so a
    # begin time two seconds from now is always in a later second.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], check=True)
    # 600 s: after the release the job waits for a scheduling pass, then imports torch, resumes and trains
    end = _until("the end", lambda: (st := _scontrol(job).get("JobState")) in ("COMPLETED", "FAILED", "CANCELLED") and st,
                 timeout_s=600.0)
    log = open(run / "slurm" / f"slurm-{job}.out").read()
    assert end == "COMPLETED", log + _daemon_logs()
    assert "SIGUSR2 received: checkpointed at step 5" in log and "resumed from" in log and "step_000005" in log, log
    assert "requeueing job" in log and state["Restarts"] == "1"
    assert json.loads((run / "status.json").read_text())["status"] == "done"
    assert _losses(run) == pytest.approx(reference, rel=1e-6)
    dump = open(run / "slurm" / f"env-{job}-restart1.txt").read()
    assert "SLURM_RESTART_COUNT=1" in dump
