"""Fault injection for tests of failure behaviour, driven by environment variables.

SEQPAR_FAULT_NAN_STEP=N        the local loss of rank SEQPAR_FAULT_RANK (default 0) is NaN at step N
SEQPAR_FAULT_KILL_AFTER_SAVE=N rank SEQPAR_FAULT_RANK is SIGKILLed right after checkpoint N is complete
SEQPAR_FAULT_KILL_MID_SAVE=N   rank SEQPAR_FAULT_RANK is SIGKILLed while checkpoint N is being written
SEQPAR_FAULT_HANG_STEP=N       rank SEQPAR_FAULT_RANK stalls at the start of step N for SEQPAR_FAULT_HANG_S
                               seconds (default 600), or until it is asked to stop (SIGTERM from torchrun)
SEQPAR_FAULT_SLOW_DATA_S=X     every rank's data preparation of every step does X seconds of CPU-bound
                               Python work (it holds the GIL, unlike a sleep): tests of data prefetch

Unset (the normal case) every hook is a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Protocol


class FaultInjector(Protocol):
    """The trainer's only view of fault injection: three hooks at the edge of the loop."""

    def nan_loss(self, step: int) -> bool: ...

    def hang(self, step: int, stop: Callable[[], bool]) -> None: ...

    def __call__(self, where: str, step: int) -> None: ...

    def slow_data(self, step: int) -> None: ...


def _env_step(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class Faults:
    """Fault injection from the environment (see the module doc); no-ops when unset."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.target = int(os.environ.get("SEQPAR_FAULT_RANK", "0"))
        self.nan_step = _env_step("SEQPAR_FAULT_NAN_STEP")
        self.kill_after_save = _env_step("SEQPAR_FAULT_KILL_AFTER_SAVE")
        self.kill_mid_save = _env_step("SEQPAR_FAULT_KILL_MID_SAVE")
        self.hang_step = _env_step("SEQPAR_FAULT_HANG_STEP")
        self.hang_s = float(os.environ.get("SEQPAR_FAULT_HANG_S", "600"))
        self.slow_data_s = float(os.environ.get("SEQPAR_FAULT_SLOW_DATA_S", "0") or 0)

    def _mine(self) -> bool:
        return self.rank == self.target

    def nan_loss(self, step: int) -> bool:
        return self.nan_step == step and self._mine()

    def hang(self, step: int, stop: Callable[[], bool]) -> None:
        """Stall like a stuck rank (a dead NIC, a deadlocked dataloader) so its peers' collectives time out."""
        if self.hang_step != step or not self._mine():
            return
        end = time.monotonic() + self.hang_s
        while time.monotonic() < end and not stop():
            time.sleep(0.05)

    def __call__(self, where: str, step: int) -> None:
        if not self._mine():
            return
        if (where == "mid_save" and self.kill_mid_save == step) or (where == "after_save" and self.kill_after_save == step):
            os.kill(os.getpid(), signal.SIGKILL)

    def slow_data(self, step: int) -> None:
        """CPU-bound work in the data job (a Python loop holds the GIL, so only real overlap hides it)."""
        if self.slow_data_s <= 0:
            return
        end = time.perf_counter() + self.slow_data_s
        x = 0
        while time.perf_counter() < end:
            for i in range(1000):
                x = (x * 31 + i) % 1_000_003
