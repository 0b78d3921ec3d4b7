"""Slurm batch scripts for seqpar runs (pure: renders text from typed options, runs nothing).

    opts = SubmitOptions(config="/abs/run/slurm/config.yaml", run_dir="/abs/run", nodes=2, nproc_per_node=8,
                         gpus_per_node=8, time="04:00:00", workdir="/abs/repo")
    script = render_sbatch(opts, template_text)

Two modes:
- ``srun`` (default): one Slurm task per rank, ``srun --kill-on-bad-exit=1 --label PYTHON -m
  seqpar.train``; each rank finds itself from SLURM_PROCID / SLURM_LOCALID and the head node
  (``seqpar.parallel.discover``).
- ``torchrun``: one task per node running ``seqpar train`` (torchrun under seqpar's signal
  forwarding) with the c10d rendezvous on the head node, the port derived from the job id.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field

MODES = ("srun", "torchrun")
#: Slurm's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
#: days-hours:minutes, days-hours:minutes:seconds.
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster", "slurm", "train.sbatch")


def time_seconds(value: str) -> int:
    """Seconds of a Slurm ``--time`` value; ValueError (one line) for what Slurm cannot parse."""
    m = _TIME.match(value.strip())
    if m is None:
        raise ValueError(f"--time {value!r} is not a Slurm time: use minutes (30), HH:MM:SS (04:00:00) or D-HH:MM:SS (1-12:00:00)")
    d, dh, dm, ds, mins, ms, hs = m.groups()
    if d is not None:
        seconds = int(d) * 86400 + int(dh) * 3600 + int(dm or 0) * 60 + int(ds or 0)
    elif hs is not None:  # hours:minutes:seconds
        seconds = int(mins) * 3600 + int(ms) * 60 + int(hs)
    else:  # minutes[:seconds]
        seconds = int(mins) * 60 + int(ms or 0)
    if seconds <= 0:
        raise ValueError(f"--time {value!r} must be longer than zero")
    return seconds


def signal_lead(seconds: int) -> int:
    """How long before the limit SIGUSR2 comes: room for one step and a checkpoint (Slurm delivers it
    up to a minute late), at most a fifth of the job."""
    return max(30, min(300, seconds // 5))


@dataclass(frozen=True)
class SubmitOptions:
    """Everything the batch script depends on. Paths are absolute (the job runs elsewhere, later)."""

    config: str  # the resolved config the job trains (RUN_DIR/slurm/config.yaml)
    run_dir: str
    nodes: int
    nproc_per_node: int
    gpus_per_node: int
    time: str
    workdir: str  # where the job runs (the submit directory)
    partition: str = ""
    account: str = ""
    qos: str = ""
    mode: str = "srun"
    max_requeues: int = 3
    sbatch_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    setup: str = ""  # shell line(s) run before the ranks start, e.g. activating an environment
    python: str = field(default_factory=lambda: sys.executable)  # "python" after a --setup that activates one
    job_name: str = "seqpar"

    def validate(self) -> None:
        """One-line ValueErrors naming the option to change."""
        if self.nodes < 1:
            raise ValueError(f"--nodes {self.nodes} must be >= 1")
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node {self.nproc_per_node} must be >= 1")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node} must be >= 0 (0: a CPU cluster)")
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r} must be one of {', '.join(MODES)}")
        if self.max_requeues < 0:
            raise ValueError(f"--max-requeues {self.max_requeues} must be >= 0")
        time_seconds(self.time)
        for key, _ in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"--env {key!r} is not a variable name (use --env NAME=VALUE)")
        for path in (self.config, self.run_dir, self.workdir) + (() if self.setup else (self.python,)):
            if not os.path.isabs(path):
                raise ValueError(f"{path!r} must be an absolute path (the job runs in another directory, later)")
        for path in (self.run_dir, self.workdir):
            if any(c.isspace() for c in path):
                raise ValueError(f"{path!r} must not contain spaces (it appears unquoted in #SBATCH lines)")


def _directives(o: SubmitOptions) -> list[str]:
    lines = []
    if o.mode == "torchrun":
        lines.append(f"#SBATCH --cpus-per-task={o.nproc_per_node}")  # the node's ranks share one task
    if o.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={o.gpus_per_node}")
    for flag, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {arg}" for arg in o.sbatch_args]
    return lines


def _launch(o: SubmitOptions) -> tuple[str, str]:
    """(the command that starts the ranks, one line saying how)."""
    py = shlex.quote(o.python)
    config = shlex.quote(o.config)
    if o.mode == "srun":
        return (f"srun --kill-on-bad-exit=1 --label --ntasks-per-node={o.nproc_per_node} {py} -m seqpar.train --config {config}",
                f"one Slurm task per rank ({o.nodes} x {o.nproc_per_node}), python -m seqpar.train")
    head = 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    port = "PORT=$((20000 + SLURM_JOB_ID % 10000))"
    rdzv = (f"--nnodes {o.nodes} --rdzv-endpoint \"$HEAD:$PORT\" --rdzv-id \"$SLURM_JOB_ID\"" if o.nodes > 1 else "")
    cmd = (f"{head}\n{port}\n"
           f"srun --kill-on-bad-exit=1 --label --ntasks-per-node=1 {py} -m seqpar.launcher train {config} "
           f"--nproc {o.nproc_per_node} {rdzv}".rstrip())
    return cmd, f"one task per node running torchrun ({o.nproc_per_node} ranks each) with the c10d rendezvous on the head node"


def render_sbatch(o: SubmitOptions, template: str) -> str:
    """The batch script: ``template`` with its ``{{name}}`` fields filled (an unknown field is an error)."""
    o.validate()
    launch, how = _launch(o)
    seconds = time_seconds(o.time)
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in o.env)
    slurm_dir = os.path.join(o.run_dir, "slurm")
    values = {
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": o.mode,
        "mode_doc": how,
        "job_name": o.job_name,
        "nodes": str(o.nodes),
        "tasks_per_node": str(o.nproc_per_node if o.mode == "srun" else 1),
        "time": o.time,
        "signal_lead": str(signal_lead(seconds)),
        "directives": "\n".join(_directives(o)),
        "run_dir": shlex.quote(o.run_dir),
        "slurm_dir": slurm_dir,
        "python": shlex.quote(o.python),
        "max_requeues": str(o.max_requeues),
        "setup": o.setup,
        "exports": exports,
        "workdir": o.workdir,
        "launch": launch,
    }

    def fill(m: re.Match) -> str:
        if m.group(1) not in values:
            raise ValueError(f"the batch template has an unknown field {{{{{m.group(1)}}}}}")
        return values[m.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", fill, template)


def parse_env(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    """``--env K=V`` values as pairs; ValueError naming a malformed one."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r} must look like NAME=VALUE")
        out.append((key, value))
    return tuple(out)


def parse_job_id(sbatch_output: str) -> int:
    """The job id from ``sbatch --parsable`` ("123" or "123;cluster")."""
    text = sbatch_output.strip().splitlines()[-1] if sbatch_output.strip() else ""
    head = text.split(";")[0]
    if not head.isdigit():
        raise ValueError(f"sbatch --parsable printed {sbatch_output.strip()[:200]!r}, not a job id")
    return int(head)
