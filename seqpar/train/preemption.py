"""SIGTERM / SIGUSR1 / SIGUSR2: checkpoint at the next step boundary and exit cleanly (Slurm
preemption: ``seqpar submit``'s jobs get SIGUSR2 ahead of their time limit), and the run's
``status.json`` that tells the batch script whether to requeue."""

from __future__ import annotations

import json
import os
import signal
import time

import torch
import torch.distributed as dist


class PreemptionFlag:
    """Records a stop request; ``should_stop`` agrees on it across ranks.

    Signals reach ranks at different moments (or only some ranks), so the decision is a max
    all-reduce at the step boundary: if any rank was asked to stop, all stop after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, group: dist.ProcessGroup | None, device: torch.device) -> bool:
        """Collective over ``group``."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


#: What ``status.json`` can say: running (or killed without a word), preempted (stopped by a signal
#: after a checkpoint: requeue), done (train.steps reached), failed (an error; do not requeue).
STATUSES = ("running", "preempted", "done", "failed")


def write_status(run_dir: str, status: str, step: int, **extra: object) -> None:
    """Write ``run_dir/status.json`` atomically (rank 0 only, the caller's business)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "status.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    record = {"status": status, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
              **extra}
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_status(run_dir: str) -> dict:
    """``run_dir/status.json``, or {} when there is none."""
    try:
        with open(os.path.join(run_dir, "status.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
