"""Run torchrun so that a stop request reaches the ranks and the job still exits 0.

torchrun itself dies on SIGUSR1 and SIGUSR2 (no handler) and turns SIGTERM into a non-zero exit, so
the launcher keeps SIGUSR1 and SIGUSR2 away from it (ignored signals are inherited; the ranks install
their own handlers) and turns a SIGTERM, SIGUSR1 or SIGUSR2 it receives into SIGUSR1 for every rank
(Slurm's ``scancel --signal`` reaches every process of the step, ranks included: a second request is
harmless). The ranks then checkpoint at the next step boundary and exit 0, and so does torchrun.
"""

from __future__ import annotations

import os
import signal
import subprocess


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Linux /proc); empty where /proc is not available."""
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` (torchrun); forward SIGTERM / SIGUSR1 / SIGUSR2 to its ranks as SIGUSR1; return its exit code."""

    def keep_usr1_away() -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, env=env, preexec_fn=keep_usr1_away)

    def forward(signum, frame) -> None:
        ranks = [p for p in descendants(proc.pid)]
        if not ranks:  # no /proc: fall back to torchrun's own SIGTERM handling
            proc.send_signal(signal.SIGTERM)
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    # Ctrl-C reaches torchrun directly (same process group); wait for it instead of dying first.
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
