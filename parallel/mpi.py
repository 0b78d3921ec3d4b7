"""The MPI side of start-up: the world size when only MPI knows it (PMIx), and the rendezvous address
broadcast from rank 0 when the launcher gave none. mpi4py is imported here only, and only when an
MPI variable is set (``pip install -e '.[mpi]'``: mpi4py and MPICH's wheels)."""

from __future__ import annotations

import socket
from collections.abc import Mapping

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


def broadcast_rendezvous(rank: int, world: int, port: int) -> tuple[str, int]:
    """Rank 0's address and a free port, sent to every rank over MPI_COMM_WORLD (collective).
    ``port`` 0: rank 0 picks a free one."""
    comm = _comm()
    if comm.Get_size() != world:
        # e.g. mpi4py built against another MPI than the launcher's: each process is a singleton
        raise LaunchEnvError(f"the launcher says {world} ranks but MPI_COMM_WORLD has {comm.Get_size()}: mpi4py uses "
                             "another MPI than mpiexec (install both from pip: pip install -e '.[mpi]')")
    payload = None
    if rank == 0:
        payload = (_my_address(), port or _free_port())
    addr, port = comm.bcast(payload, root=0)
    return addr, port


def _my_address() -> str:
    """An address of this host the other nodes can reach: the one its hostname resolves to, unless that
    is a loopback address (then the hostname itself, which on one node is fine)."""
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return host
    return host if addr.startswith("127.") else addr


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
