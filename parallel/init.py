"""Process-group start-up: rank discovery (``seqpar.parallel.discover``, a pure function of the
environment: torchrun, Slurm steps, Open MPI, MPICH/Hydra, PMIx, or none) and backend choice.

With no launcher the process is a world of one on an in-memory store. Under MPI without
MASTER_ADDR, rank 0 opens the store and broadcasts its address and port with mpi4py
(``seqpar.parallel.mpi``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar.parallel.discover import RankInfo, device_index, discover
from seqpar.parallel.mpi import mpi_world_size, rendezvous_store, under_mpi  # mpi4py itself only on use


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    local_world: int = 1
    launcher: str = "single"
    restart_count: int = 0


def rank_info() -> RankInfo:
    """``discover(os.environ)``, asking MPI for what only it knows (PMIx's world size)."""
    env = os.environ
    mpi_size = None
    if under_mpi(env) and env.get("PMIX_RANK") and not (env.get("SLURM_STEP_NUM_TASKS") or env.get("OMPI_COMM_WORLD_SIZE")):
        mpi_size = mpi_world_size()
    return discover(env, mpi_size)


def init_distributed(backend: str = "auto", timeout_s: float = 600.0, flight_recorder: int = 0,
                     dump_prefix: str = "") -> DistInfo:
    """Initialise the default process group (collective over all ranks).

    backend: "auto" picks NCCL when CUDA is available and gloo otherwise. The device is the local
    rank's GPU (or GPU 0 when each rank sees one). Under NCCL, ``timeout_s`` also sets the
    watchdog's heartbeat, async error handling is on, and ``flight_recorder`` > 0 keeps that many
    collectives per rank, dumped to ``dump_prefix`` + rank on a timeout (``seqpar.parallel.nccl``).
    Idempotent.
    """
    info = rank_info()
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend={backend!r} must be one of 'auto', 'nccl', 'gloo'")
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("backend nccl needs CUDA, but no GPU is visible; use backend gloo")
    if backend == "nccl":
        from seqpar.parallel.nccl import nccl_environment

        for key, value in nccl_environment(timeout_s, flight_recorder, dump_prefix).items():
            os.environ.setdefault(key, value)  # read when the NCCL process group is created
        if flight_recorder and dump_prefix:
            os.makedirs(os.path.dirname(dump_prefix), exist_ok=True)
        device = torch.device("cuda", device_index(info.local_rank, info.local_world, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        device_id = device if backend == "nccl" else None
        if info.world == 1 and not info.master_port:
            # One process and no rendezvous given: an in-memory store, so no port is chosen here and
            # bound later (another process could take it in between).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                    device_id=device_id)
        elif info.launcher in ("openmpi", "mpich", "pmix") and not info.master_addr:
            addr, store = rendezvous_store(info.rank, info.world, info.master_port, timeout)
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(store.port)
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world,
                                    timeout=timeout, device_id=device_id)
        else:
            addr = info.master_addr or "127.0.0.1"
            # torch reads these too (e.g. for the store of new groups); keep them consistent with ours
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(info.master_port)
            dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world,
                                    timeout=timeout, device_id=device_id)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=info.local_rank, device=device,
                    backend=backend, local_world=info.local_world, launcher=info.launcher, restart_count=info.restart_count)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
