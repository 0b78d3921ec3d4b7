"""Fault injection for tests of failure behaviour, driven by environment variables.

SEQPAR_FAULT_NAN_STEP=N        the local loss of rank SEQPAR_FAULT_RANK (default 0) is NaN at step N
SEQPAR_FAULT_KILL_AFTER_SAVE=N rank SEQPAR_FAULT_RANK is SIGKILLed right after checkpoint N is complete
SEQPAR_FAULT_KILL_MID_SAVE=N   rank SEQPAR_FAULT_RANK is SIGKILLed while checkpoint N is being written

Unset (the normal case) every hook is a no-op.
"""

from __future__ import annotations

import os
import signal


def _env_step(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class Faults:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.target = int(os.environ.get("SEQPAR_FAULT_RANK", "0"))
        self.nan_step = _env_step("SEQPAR_FAULT_NAN_STEP")
        self.kill_after_save = _env_step("SEQPAR_FAULT_KILL_AFTER_SAVE")
        self.kill_mid_save = _env_step("SEQPAR_FAULT_KILL_MID_SAVE")

    def _mine(self) -> bool:
        return self.rank == self.target

    def nan_loss(self, step: int) -> bool:
        return self.nan_step == step and self._mine()

    def __call__(self, where: str, step: int) -> None:
        if not self._mine():
            return
        if (where == "mid_save" and self.kill_mid_save == step) or (where == "after_save" and self.kill_after_save == step):
            os.kill(os.getpid(), signal.SIGKILL)
