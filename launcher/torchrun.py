"""torchrun command lines for seqpar runs (pure: builds argument lists, runs nothing)."""

from __future__ import annotations

import shlex
import sys


def torchrun_cmd(
    config: str,
    overrides: list[str],
    nproc: int,
    *,
    nnodes: int = 1,
    rdzv_endpoint: str = "",
    rdzv_id: str = "seqpar",
    python: str | None = None,
) -> list[str]:
    """torchrun for ``python -m seqpar.train`` on ``nproc`` ranks per node.

    One node: ``--standalone`` (a local rendezvous on a free port). Several nodes: the c10d
    rendezvous at ``rdzv_endpoint`` (HOST:PORT), the same command on every node. Uses
    ``python -m torch.distributed.run`` (what the ``torchrun`` script runs) so the command works
    in any virtual environment without relying on PATH.
    """
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    if nnodes > 1:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--rdzv-endpoint={rdzv_endpoint!r} must look like HOST:PORT, e.g. node0:29400")
        rendezvous = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    else:
        rendezvous = ["--standalone"]
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc_per_node={nproc}",
        "-m",
        "seqpar.train",
        "--config",
        config,
        *overrides,
    ]


def format_cmd(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
