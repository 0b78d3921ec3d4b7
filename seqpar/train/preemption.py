"""SIGTERM / SIGUSR1: checkpoint at the next step boundary and exit cleanly (Slurm preemption)."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionFlag:
    """Records a stop request; ``should_stop`` agrees on it across ranks.

    Signals reach ranks at different moments (or only some ranks), so the decision is a max
    all-reduce at the step boundary: if any rank was asked to stop, all stop after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

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
