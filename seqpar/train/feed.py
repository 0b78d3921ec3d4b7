"""The trainer's data feed: each step's micro-batches, prepared in a background thread while the
previous step trains (``data.prefetch``), for static SP and for adaptive plans.

    feed.start(step, consumed)          # main thread, collective for adaptive (the first plan)
    batch = feed.next(step)             # waits for the prefetched micro-batches: batch.data_wait_s
    ... forward and backward ...
    feed.after_backward(step)           # adaptive: the next plan (broadcast) goes to the thread

The thread never runs a collective: the plan broadcast and decompose's bucket check stay on the
main thread. It reads the next step's tokens (only this rank's share), packs streams, computes
labels, positions and document ids, builds layouts and shards, and pins them on CUDA; the main
thread moves them to the device with non-blocking copies. The checkpoint's data position is the
trained step's, never the prefetched one: it is a function of the step number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from seqpar.train.batch import MicroBatch
from seqpar.train.microbatches import MicroBatchBuilder

if TYPE_CHECKING:
    from seqpar.scatter.executor import AdaptiveExecutor, StepPlan


@dataclass
class StepBatch:
    """This rank's micro-batches of one step, on the device.

    doc_lengths: the documents whose FLOPs this rank reports (summed over dp by the trainer);
    data_wait_s: how long the main thread waited for them; plan: the adaptive plan (else None).
    """

    step: int
    micro_batches: list[MicroBatch]
    doc_lengths: list[int]
    data_wait_s: float = 0.0
    plan: StepPlan | None = None


class _Worker:
    """One background thread running data jobs in submission order, or inline without prefetch."""

    def __init__(self, prefetch: bool) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqpar-data") if prefetch else None
        self._jobs: dict[int, Future | Callable[[], StepBatch]] = {}

    def submit(self, step: int, job: Callable[[], StepBatch]) -> None:
        self._jobs[step] = self._pool.submit(job) if self._pool is not None else job

    def has(self, step: int) -> bool:
        return step in self._jobs

    def take(self, step: int) -> Future | Callable:
        """Remove and return ``step``'s job unwaited (a later job consumes its result)."""
        return self._jobs.pop(step)

    def wait(self, step: int) -> tuple[StepBatch, float]:
        """The job's result and the seconds the caller waited for it (the whole job without prefetch)."""
        job = self._jobs.pop(step)
        t0 = time.perf_counter()
        out = job.result() if isinstance(job, Future) else job()
        return out, time.perf_counter() - t0

    def wait_pending(self) -> None:
        """Block until every queued job has finished (tests: a step longer than the data work)."""
        for job in list(self._jobs.values()):
            if isinstance(job, Future):
                job.exception()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._jobs.clear()


def _to_device(mbs: list[MicroBatch], device: torch.device) -> list[MicroBatch]:
    return [mb.to(device) for mb in mbs]


def _pin(mbs: list[MicroBatch]) -> list[MicroBatch]:
    return [mb.pin() for mb in mbs]


class _Feed:
    """What both feeds share: the data worker, the device move and the wait measurement."""

    def __init__(self, num_steps: int, device: torch.device, prefetch: bool,
                 slow: Callable[[int], None] | None) -> None:
        self.num_steps, self.device, self.slow = num_steps, device, slow
        self._worker = _Worker(prefetch)

    def _deliver(self, step: int) -> StepBatch:
        """Wait for ``step``'s job and move its micro-batches to the device."""
        batch, waited = self._worker.wait(step)
        batch.micro_batches = _to_device(batch.micro_batches, self.device)
        batch.data_wait_s = waited
        return batch

    def after_backward(self, step: int) -> None:
        pass

    def wait_pending(self) -> None:
        """Block until the queued data jobs have finished (tests model a step longer than the data
        work this way instead of depending on thread timing)."""
        self._worker.wait_pending()

    def close(self) -> None:
        self._worker.close()


class StaticFeed(_Feed):
    """Static SP: this dp rank's streams of each step, sharded by ``builder`` on the host.

    rank_streams(step, consumed) -> streams; consumed advances by ``streams_per_step`` per step.
    slow: a hook run in the data job (fault injection: CPU-bound work).
    """

    def __init__(self, rank_streams: Callable, builder: MicroBatchBuilder, streams_per_step: int, num_steps: int,
                 device: torch.device, prefetch: bool, slow: Callable[[int], None] | None = None) -> None:
        super().__init__(num_steps, device, prefetch, slow)
        self.rank_streams, self.builder, self.streams_per_step = rank_streams, builder, streams_per_step
        self._start = self._consumed = 0

    def _job(self, step: int) -> Callable[[], StepBatch]:
        consumed = self._consumed + (step - self._start) * self.streams_per_step

        def job() -> StepBatch:
            if self.slow is not None:
                self.slow(step + 1)
            streams = self.rank_streams(step, consumed)
            lengths = [int(n) for s in streams for n in np.diff(s.cu_seqlens)]
            return StepBatch(step, _pin(self.builder.build(streams, step)), lengths)

        return job

    def start(self, step: int, consumed: int) -> None:
        self._start, self._consumed = step, consumed
        if step < self.num_steps:
            self._worker.submit(step, self._job(step))

    def next(self, step: int) -> StepBatch:
        if not self._worker.has(step):
            self._worker.submit(step, self._job(step))
        if step + 1 < self.num_steps:  # queued behind this step's job: prepared while this step trains
            self._worker.submit(step + 1, self._job(step + 1))
        return self._deliver(step)


class AdaptiveFeed(_Feed):
    """Adaptive plans: rank 0 plans step t+1 while step t trains; after step t's backward the plan is
    broadcast (main thread) and the thread builds this rank's micro-batches of it.

    The thread reads step t+1's sequences when step t starts (stage 1), and packs, shards and pins
    them when the plan arrives (stage 2).
    """

    def __init__(self, executor: AdaptiveExecutor, num_steps: int, device: torch.device, prefetch: bool,
                 slow: Callable[[int], None] | None = None) -> None:
        super().__init__(num_steps, device, prefetch, slow)
        self.executor = executor
        self.last_plan = None
        self._loader = _Worker(prefetch)

    def _load_job(self, step: int) -> Callable[[], list[np.ndarray]]:
        steps = self.executor.steps

        def job():
            if self.slow is not None:
                self.slow(step + 1)
            return [steps.sequence(step, i) for i in range(len(steps.step_lengths(step)))]

        return job

    def _build_job(self, step: int, plan: StepPlan) -> Callable[[], StepBatch]:
        load = self._loader.take(step)

        def job() -> StepBatch:
            seqs = load.result() if isinstance(load, Future) else load()
            mbs = self.executor.build(step, plan, torch.device("cpu"), sequences=seqs)
            lengths = [int(x) for x in self.executor.steps.step_lengths(step)]
            return StepBatch(step, _pin(mbs), lengths, plan=plan)

        return job

    def _plan_and_build(self, step: int) -> None:
        plan = self.last_plan = self.executor.plan(step)  # collective; rank 0 waits for its planner here
        self.executor.request(step + 1)  # planned while this step's micro-batches are built and trained
        if not self._loader.has(step):
            self._loader.submit(step, self._load_job(step))
        self._worker.submit(step, self._build_job(step, plan))

    def start(self, step: int, consumed: int) -> None:
        if step >= self.num_steps:
            return
        self._loader.submit(step, self._load_job(step))
        self.executor.request(step)
        self._plan_and_build(step)  # the first plan is not hidden: nothing trains yet

    def next(self, step: int) -> StepBatch:
        if step + 1 < self.num_steps:  # stage 1 of the next step while this one trains
            self._loader.submit(step + 1, self._load_job(step + 1))
        return self._deliver(step)

    def after_backward(self, step: int) -> None:
        if step + 1 < self.num_steps:
            self._plan_and_build(step + 1)

    def wait_pending(self) -> None:
        self._loader.wait_pending()
        super().wait_pending()

    def close(self) -> None:
        super().close()
        self._loader.close()
        self.executor.close()
