"""Shared test machinery: persistent pools of gloo worker processes.

Spawning a process group costs seconds, so each world size gets one pool per pytest session
and many cases run inside it. Functions sent to a pool must be importable (module level).
Every call has a timeout: a hang fails the test instead of blocking CI.

    def _case(x):                       # runs on every rank, inside an initialised gloo group
        return dist.get_rank() * x

    def test_something(dist_pool):
        assert dist_pool(2).run(_case, 3) == [0, 3]
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from typing import Any


def _worker(rank: int, world_size: int, conn, collective_timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    # Rank 0 binds the store's port itself (port 0: the kernel picks a free one) and the parent
    # passes it on: no port is chosen here and bound later, which another process could take between.
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        conn.send(store.port)
        port = store.port
    else:
        port = conn.recv()
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion errors, to the test
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """``world_size`` spawned processes in one gloo group, running submitted functions on all ranks."""

    def __init__(self, world_size: int, collective_timeout_s: float = 120.0) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._conns = []
        self._procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(rank, world_size, child, collective_timeout_s), daemon=True)
            p.start()
            self._conns.append(parent)
            self._procs.append(p)
        self.broken = False
        # rank 0's store port, to the other ranks (a hang guard: rank 0 only imports torch first)
        if not self._conns[0].poll(600):
            self.close(force=True)
            raise TimeoutError(f"rank 0 of {world_size} did not open its store in 600 s")
        port = self._conns[0].recv()
        for c in self._conns[1:]:
            c.send(port)

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 600.0, **kwargs: Any) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank; returns the per-rank results in rank order."""
        if self.broken:
            raise RuntimeError("this pool failed earlier and was closed")
        for c in self._conns:
            c.send((fn, args, kwargs))
        results: list[Any] = [None] * self.world_size
        errors: list[str] = []
        import time

        deadline = time.monotonic() + timeout_s
        for rank, c in enumerate(self._conns):
            if not c.poll(max(0.0, deadline - time.monotonic())):
                self.close(force=True)
                raise TimeoutError(f"rank {rank} of {self.world_size} did not finish {fn.__name__} in {timeout_s:.0f}s (hang?)")
            status, value = c.recv()
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            # Ranks may be left inside a collective with a failed peer: start afresh next time.
            self.close(force=True)
            raise AssertionError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return results

    def close(self, force: bool = False) -> None:
        self.broken = True
        if not force:
            for c in self._conns:
                try:
                    c.send(None)
                except (BrokenPipeError, OSError):
                    pass
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


class PoolFactory:
    """One live pool per world size, recreated after a failure."""

    def __init__(self) -> None:
        self._pools: dict[int, DistPool] = {}

    def __call__(self, world_size: int) -> DistPool:
        pool = self._pools.get(world_size)
        if pool is None or pool.broken:
            pool = self._pools[world_size] = DistPool(world_size)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            if not pool.broken:
                pool.close()
        self._pools.clear()


_SP_GROUPS: dict = {}


def sp_groups(ulysses: int, ring: int):
    """Inside a pool worker: seqpar Groups of a dp=1, sp=world layout ``ulysses x ring`` of the whole
    pool, created once per shape (group creation is collective, so every rank calls this in step)."""
    key = (ulysses, ring)
    if key not in _SP_GROUPS:
        import torch.distributed as dist

        from seqpar.parallel.dims import ParallelDims
        from seqpar.parallel.mesh import build_groups

        world = dist.get_world_size()
        _SP_GROUPS[key] = build_groups(ParallelDims(1, world, ulysses, ring, world), "cpu")
    return _SP_GROUPS[key]
