"""torchrun command lines for seqpar runs (pure: builds argument lists, runs nothing)."""

from __future__ import annotations

import shlex
import sys


def torchrun_cmd(config: str, overrides: list[str], nproc: int, python: str | None = None) -> list[str]:
    """``torchrun --standalone`` for one node running ``python -m seqpar.train`` on ``nproc`` ranks.

    Uses ``python -m torch.distributed.run`` (what the ``torchrun`` script runs) so the command
    works in any virtual environment without relying on PATH.
    """
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "seqpar.train",
        "--config",
        config,
        *overrides,
    ]


def format_cmd(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
