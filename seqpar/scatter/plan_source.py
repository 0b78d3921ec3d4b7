"""Where a training run's plans come from (on rank 0): a planner process, the calling thread, or a test.

    src = PlannerProcess(cm, PlannerOptions(time_limit_s=1.0, bound_time_s=0))
    src.request(5, lengths)       # returns at once; the process plans step 5 while step 4 trains
    reply = src.result(5)         # blocks until it is done: PlanReply(plan_json, solve_s, ...)
    src.close()

Why a process and not a thread: highspy releases the GIL during ``run()``, but the level builds
and the search around it are pure Python under wall-clock deadlines, so a planner thread would
take the GIL from the training loop (and the loop's Python would eat the planner's budget).
A ``subprocess`` (not ``multiprocessing``) so that it also starts from daemonic processes
(test pools), with pickled messages over its stdin/stdout.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from seqpar.scatter.costmodel import CostModel
from seqpar.scatter.plan import Plan
from seqpar.scatter.planner import PlannerOptions, plan_step


@dataclass(frozen=True)
class PlanReply:
    """One planned step. plan_json: the serialised ``Plan`` ("" when planning failed, see error);
    solve_s: the planner's wall time; method: how the plan was found; predicted_s: its step time."""

    step: int
    plan_json: str
    solve_s: float
    method: str
    predicted_s: float
    error: str = ""


def plan_reply(cm: CostModel, opts: PlannerOptions, step: int, lengths) -> PlanReply:
    """Plan one step (pure; a PlanError or CostModelError becomes ``error``)."""
    t0 = time.perf_counter()
    try:
        res = plan_step(cm, [int(x) for x in lengths], opts)
    except ValueError as e:  # PlanError, CostModelError
        return PlanReply(step, "", time.perf_counter() - t0, "failed", 0.0, str(e))
    return PlanReply(step, res.plan.to_json(), res.solve_s, res.method, res.predicted_step_s)


class PlanSource(Protocol):
    """Rank 0's planner: ``request`` a step's plan ahead, collect it with ``result``."""

    def request(self, step: int, lengths: np.ndarray) -> None: ...

    def result(self, step: int) -> PlanReply: ...

    def close(self) -> None: ...


class _OnCall:
    """A source that plans on the calling thread when the result is asked for; ``plan`` does it."""

    def __init__(self) -> None:
        self._pending: dict[int, np.ndarray] = {}

    def request(self, step: int, lengths: np.ndarray) -> None:
        self._pending[step] = np.asarray(lengths)

    def result(self, step: int) -> PlanReply:
        return self.plan(step, self._pending.pop(step))

    def plan(self, step: int, lengths: np.ndarray) -> PlanReply:
        raise NotImplementedError

    def close(self) -> None:
        self._pending.clear()


class InlinePlanner(_OnCall):
    """The planner on the calling thread (tests, deterministic runs)."""

    def __init__(self, cm: CostModel, opts: PlannerOptions) -> None:
        super().__init__()
        self.cm, self.opts = cm, opts

    def plan(self, step: int, lengths: np.ndarray) -> PlanReply:
        return plan_reply(self.cm, self.opts, step, lengths)


class ForcedPlans(_OnCall):
    """Plans chosen by a function of (step, lengths): tests that need particular group shapes."""

    def __init__(self, make: Callable[[int, np.ndarray], Plan]) -> None:
        super().__init__()
        self.make = make

    def plan(self, step: int, lengths: np.ndarray) -> PlanReply:
        plan = self.make(step, lengths)
        return PlanReply(step, plan.to_json(), 0.0, "forced", plan.predicted_step_s)


class StaticPlans(_OnCall):
    """The static baseline through the executor: every group of one degree, sequences best-fit
    packed (``baselines.static_plan``, what Megatron-CP / DeepSpeed-Ulysses do)."""

    def __init__(self, cm: CostModel, degree: int) -> None:
        super().__init__()
        self.cm, self.degree = cm, degree

    def plan(self, step: int, lengths: np.ndarray) -> PlanReply:
        from seqpar.scatter.baselines import static_plan

        t0 = time.perf_counter()
        got = static_plan(self.cm, [int(x) for x in lengths], self.degree)
        if got is None:
            return PlanReply(step, "", 0.0, "static", 0.0,
                             f"scatter.static_degree={self.degree} cannot hold the step's longest sequence "
                             f"(K={self.cm.capacity} tokens per rank, at most {self.cm.max_degree} ranks per group)")
        return PlanReply(step, got[1].to_json(), time.perf_counter() - t0, f"static degree {self.degree}", got[0])


_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
_CHILD = ("import signal\n"
          f"for name in {_STOP_SIGNALS!r}:\n"
          "    signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
          "from seqpar.scatter.plan_source import serve\n"
          "serve()\n")


class PlannerProcess:
    """A planner in a child process (``serve``), one step at a time, in the order requested."""

    def __init__(self, cm: CostModel, opts: PlannerOptions) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        # -c, not -m: under -m this module would be __main__ and its pickled replies would name
        # classes the parent cannot find. The child ignores stop signals from its first line on:
        # `seqpar train` forwards a stop to every process below torchrun and `scancel --signal`
        # reaches every process of the step, and a caught handler does not survive exec, so the
        # planner would die while its rank checkpoints. Its life is the pipe's: EOF ends it.
        self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._send(("init", cm, opts))
        self._asked: list[int] = []

    def _send(self, msg: tuple) -> None:
        assert self._proc.stdin is not None
        pickle.dump(msg, self._proc.stdin)
        self._proc.stdin.flush()

    def request(self, step: int, lengths: np.ndarray) -> None:
        self._send(("plan", step, np.asarray(lengths, dtype=np.int64)))
        self._asked.append(step)

    def result(self, step: int) -> PlanReply:
        if not self._asked or self._asked[0] != step:
            raise RuntimeError(f"plan of step {step} was not requested next (pending: {self._asked})")
        self._asked.pop(0)
        try:
            reply = pickle.load(self._proc.stdout)
        except EOFError:
            code = self._proc.poll()
            raise RuntimeError(f"the planner process exited (code {code}) before planning step {step}; "
                               "see its error above") from None
        return reply

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send(("exit",))
                self._proc.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()


def serve() -> None:
    """The child's loop: replies go to the real stdout; anything printed goes to stderr."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    cm = opts = None
    while True:
        try:
            msg = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        if msg[0] == "init":
            cm, opts = msg[1], msg[2]
        elif msg[0] == "plan":
            pickle.dump(plan_reply(cm, opts, msg[1], msg[2]), out)
            out.flush()
        else:
            return
