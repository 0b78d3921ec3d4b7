"""The MPI side of start-up: the world size when only MPI knows it (PMIx), and, when the launcher
named no rendezvous, the process group's store, opened by rank 0 with its address broadcast.
mpi4py is imported here only, and only when an MPI variable is set (``pip install -e '.[mpi]'``:
mpi4py and MPICH's wheels)."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Mapping

import torch.distributed as dist

from seqpar.parallel.discover import LaunchEnvError

MPI_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def under_mpi(env: Mapping[str, str]) -> bool:
    return any(env.get(v, "") != "" for v in MPI_VARIABLES)


def _comm():
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchEnvError("started by MPI but mpi4py is not installed: pip install -e '.[mpi]'") from None
    return MPI.COMM_WORLD


def mpi_world_size() -> int:
    """MPI_COMM_WORLD's size (initialises MPI)."""
    return _comm().Get_size()


def rendezvous_store(rank: int, world: int, port: int, timeout: datetime.timedelta) -> tuple[str, dist.TCPStore]:
    """The process group's store when MPI started the ranks and nobody named a rendezvous (collective over
    MPI_COMM_WORLD): rank 0 opens it (``port`` 0: the kernel picks one, bound before anyone hears of
    it, so no other process can take it in between) and broadcasts its address and port; the other
    ranks connect. Returns (address, store)."""
    comm = _comm()
    if comm.Get_size() != world:
        # e.g. mpi4py built against another MPI than the launcher's: each process is a singleton
        raise LaunchEnvError(f"the launcher says {world} ranks but MPI_COMM_WORLD has {comm.Get_size()}: mpi4py uses "
                             "another MPI than mpiexec (install both from pip: pip install -e '.[mpi]')")
    store, payload = None, None
    if rank == 0:
        addr = _my_address()
        store = dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, wait_for_workers=False)
        payload = (addr, store.port)
    addr, port = comm.bcast(payload, root=0)
    if store is None:
        store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    return addr, store


def _my_address() -> str:
    """An address of this host the other nodes can reach: the one its hostname resolves to, unless that
    is a loopback address (then the hostname itself, which on one node is fine)."""
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return host
    return host if addr.startswith("127.") else addr
