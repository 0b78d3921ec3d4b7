"""mpiexec command lines for seqpar runs (pure: builds argument lists; ``detect_flavor`` reads
``mpiexec --version``).

    seqpar train configs/tiny-cpu.yaml --launcher mpi --nproc 2 [--hosts node1,node2]

Every rank runs ``python -m seqpar.train``; rank discovery reads the MPI variables
(``seqpar.parallel.discover``) and, without MASTER_ADDR, rank 0 broadcasts its address with mpi4py.
MPICH's Hydra forwards the whole environment by default; Open MPI forwards to remote nodes only
what ``-x`` names, and refuses to run as root without ``--allow-run-as-root``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping

#: Variables Open MPI must be told to forward (Hydra forwards everything): where Python and the
#: libraries are, threads, and the rendezvous when the user gives one.
FORWARD = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT")
FORWARD_PREFIXES = ("SEQPAR_", "NCCL_", "TORCH_")


def detect_flavor(version_text: str) -> str:
    """"openmpi" or "mpich" (Hydra; also Intel MPI and MVAPICH) from ``mpiexec --version``'s output."""
    text = version_text.lower()
    if "open mpi" in text or "open-mpi" in text or "openrte" in text:
        return "openmpi"
    if "hydra" in text or "mpich" in text or "intel" in text:
        return "mpich"
    raise ValueError(f"mpiexec --version names neither Open MPI nor MPICH/Hydra: {version_text.strip()[:80]!r}")


def find_mpiexec() -> str:
    """The mpiexec beside this Python (pip's mpich wheel puts it there), else the one on PATH."""
    here = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    found = here or shutil.which("mpiexec")
    if not found:
        raise ValueError("--launcher mpi: no mpiexec beside this Python or on PATH; pip install -e '.[mpi]' (mpi4py and MPICH)")
    return found


def mpiexec_version(mpiexec: str) -> str:
    try:
        done = subprocess.run([mpiexec, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    except FileNotFoundError:
        raise ValueError(f"--launcher mpi: {mpiexec} is not on PATH; pip install -e '.[mpi]' (mpi4py and MPICH)") from None
    return done.stdout


def mpiexec_cmd(config: str, overrides: list[str], nproc: int, *, flavor: str, hosts: str = "", python: str | None = None,
                env: Mapping[str, str] | None = None, as_root: bool = False, mpiexec: str = "mpiexec") -> list[str]:
    """mpiexec for ``python -m seqpar.train`` on ``nproc`` ranks in all (``hosts``: comma-separated,
    ranks filled in order)."""
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    env = env or {}
    if flavor == "mpich":
        launch = [mpiexec, "-n", str(nproc)] + (["-hosts", hosts] if hosts else [])
    elif flavor == "openmpi":
        launch = [mpiexec, "-np", str(nproc)] + (["--host", hosts] if hosts else []) + (["--allow-run-as-root"] if as_root else [])
        names = [k for k in env if k in FORWARD or k.startswith(FORWARD_PREFIXES)]
        for name in sorted(names):
            launch += ["-x", name]
    else:
        raise ValueError(f"MPI flavor {flavor!r} must be 'mpich' or 'openmpi'")
    return [*launch, python or sys.executable, "-m", "seqpar.train", "--config", config, *overrides]
