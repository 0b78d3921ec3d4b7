"""Rank discovery: who am I in which world, and where is the rendezvous, from the environment alone.

    info = discover(os.environ)          # pure: a mapping in, a RankInfo out, one-line errors

Launchers, first match wins (torchrun inside an srun step sets RANK, so torchrun comes first):

- ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
- ``slurm`` (one task per rank, ``srun python -m seqpar.train``): SLURM_PROCID, SLURM_LOCALID, the
  size from SLURM_STEP_NUM_TASKS, the tasks on this node from SLURM_STEP_TASKS_PER_NODE and
  SLURM_NODEID, the head node expanded from SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) here, in
  Python (no ``scontrol`` call per rank), the port derived from the job id unless MASTER_PORT is
  set. Slurm's variables count only inside a job step (SLURM_STEP_ID set): the batch shell has
  SLURM_PROCID=0 and SLURM_NTASKS but no step, and a process started there is a world of one
  instead of waiting for ranks that never come.
- ``openmpi``: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE.
- ``mpich`` (Hydra): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS.
- ``pmix``: PMIX_RANK exports no world size: it is paired with Slurm's or Open MPI's, else taken
  from ``mpi_size`` (the caller asks mpi4py).
- ``single``: none of these: a world of one.

Under MPI without MASTER_ADDR the address is left empty: rank 0 opens the store and broadcasts it
(``seqpar.parallel.mpi``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

#: Ports derived from a Slurm job id: below Linux's ephemeral range (32768+), above common services.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


class LaunchEnvError(ValueError):
    """The launcher's environment is inconsistent; the message is one line naming the variables."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the world, as the launcher describes it.

    master_addr "" and master_port 0 mean "not given": a world of one uses an in-memory store;
    under MPI rank 0 broadcasts its own address and port."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | openmpi | mpich | pmix | single
    restart_count: int = 0  # SLURM_RESTART_COUNT (absent on the first run) or TORCHELASTIC_RESTART_COUNT


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name, "")
    if value == "":
        if default is None:
            raise LaunchEnvError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None


def _port(env: Mapping[str, str]) -> int:
    port = _int(env, "MASTER_PORT", 0)
    if env.get("MASTER_PORT") and not 0 < port < 65536:
        raise LaunchEnvError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return port


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded: ``"gpu[01-03,7],login"`` -> gpu01, gpu02, gpu03,
    gpu7, login (zero padding kept; several bracket groups in one name are expanded left to right)."""
    item_re = r"[^,\[\]]+(?:\[[^\[\]]+\][^,\[\]]*)*|\[[^\[\]]+\][^,\[\]]*(?:\[[^\[\]]+\][^,\[\]]*)*"
    if not re.fullmatch(rf"(?:{item_re})(?:,(?:{item_re}))*", nodelist):
        raise LaunchEnvError(f"cannot parse the Slurm node list {nodelist!r}")
    hosts: list[str] = []
    for item in re.findall(item_re, nodelist):
        m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
        if m is None:
            hosts.append(item)
            continue
        prefix, ranges, rest = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
                raise LaunchEnvError(f"cannot parse the Slurm node list {nodelist!r} (range {part!r})")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.extend(f"{prefix}{n:0{len(lo)}d}{tail}" for tail in (expand_nodelist(rest) if rest else [""]))
    return hosts


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from Slurm's ``"2(x3),1"`` (three nodes with 2 tasks, one with 1)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise LaunchEnvError(f"cannot parse SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchEnvError(f"SLURM_NODEID={node_id} but SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r} lists {len(counts)} nodes")
    return counts[node_id]


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job: every task derives the same one from the job id."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _slurm(env: Mapping[str, str]) -> RankInfo:
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 0) or None)
    node_id = _int(env, "SLURM_NODEID", 0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    local_world = tasks_on_node(per_node, node_id) if per_node else world
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    addr = env.get("MASTER_ADDR", "")
    if not addr:
        if not nodes:
            raise LaunchEnvError("inside a Slurm step but SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are not set; set MASTER_ADDR")
        addr = expand_nodelist(nodes)[0]
    port = _port(env) or slurm_port(_int(env, "SLURM_JOB_ID"))
    return RankInfo(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"), local_world, addr, port, "slurm",
                    _int(env, "SLURM_RESTART_COUNT", 0))


def _mpi(env: Mapping[str, str], launcher: str, names: tuple[str, str, str, str]) -> RankInfo:
    rank_v, size_v, local_v, local_size_v = names
    world = _int(env, size_v)
    local_world = _int(env, local_size_v, world)
    local_rank = _int(env, local_v, 0 if local_world == 1 else None)
    return RankInfo(_int(env, rank_v), world, local_rank, local_world, env.get("MASTER_ADDR", ""), _port(env), launcher)


def _pmix(env: Mapping[str, str], mpi_size: int | None) -> RankInfo:
    """PMIx exports PMIX_RANK but no world size and no local rank: borrow them from the launcher
    beside it (Slurm or Open MPI), else the world size from MPI itself (``mpi_size``)."""
    size = env.get("SLURM_STEP_NUM_TASKS") or env.get("OMPI_COMM_WORLD_SIZE") or (str(mpi_size) if mpi_size else "")
    if not size:
        raise LaunchEnvError("PMIX_RANK is set but no world size is: run under srun or Open MPI's mpirun, "
                             "or install mpi4py (pip install -e '.[mpi]') so that MPI can tell")
    world = _int({"the PMIx world size": size}, "the PMIx world size")
    local = env.get("SLURM_LOCALID") or env.get("OMPI_COMM_WORLD_LOCAL_RANK") or ("0" if world == 1 else "")
    if not local:
        raise LaunchEnvError("PMIX_RANK is set but no local rank is (SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK): "
                             "start the ranks with srun or Open MPI's mpirun")
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 0) or world
    return RankInfo(_int(env, "PMIX_RANK"), world, _int({"the PMIx local rank": local}, "the PMIx local rank"),
                    local_world, env.get("MASTER_ADDR", ""), _port(env), "pmix")


def _check(info: RankInfo) -> RankInfo:
    what = f"({info.launcher})"
    if info.world < 1:
        raise LaunchEnvError(f"world size {info.world} {what} must be >= 1")
    if not 0 <= info.rank < info.world:
        raise LaunchEnvError(f"rank {info.rank} is outside a world of {info.world} {what}")
    if not 1 <= info.local_world <= info.world:
        raise LaunchEnvError(f"{info.local_world} ranks on this node {what} but a world of {info.world}")
    if not 0 <= info.local_rank < info.local_world:
        raise LaunchEnvError(f"local rank {info.local_rank} is outside the {info.local_world} ranks on this node {what}")
    return info


def discover(env: Mapping[str, str], mpi_size: int | None = None) -> RankInfo:
    """Rank, world, local rank and rendezvous from a launcher's environment (see the module doc).
    Raises LaunchEnvError (one line naming the variables) when they contradict each other."""
    if env.get("RANK", "") != "" or env.get("WORLD_SIZE", "") != "":
        if env.get("RANK", "") == "" or env.get("WORLD_SIZE", "") == "":
            raise LaunchEnvError("RANK and WORLD_SIZE must be set together (torchrun sets both)")
        world = _int(env, "WORLD_SIZE")
        info = RankInfo(_int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0 if world == 1 else None),
                        _int(env, "LOCAL_WORLD_SIZE", world), env.get("MASTER_ADDR", ""), _port(env), "torchrun",
                        _int(env, "TORCHELASTIC_RESTART_COUNT", 0))
        if world > 1 and not (info.master_addr and info.master_port):
            raise LaunchEnvError("WORLD_SIZE > 1 but MASTER_ADDR or MASTER_PORT is not set; "
                                 "launch with torchrun (seqpar train --nproc N)")
        return _check(info)
    if env.get("SLURM_STEP_ID", "") != "" and env.get("SLURM_PROCID", "") != "":
        return _check(_slurm(env))
    if env.get("OMPI_COMM_WORLD_RANK", "") != "":
        return _check(_mpi(env, "openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                            "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")))
    if env.get("PMI_RANK", "") != "":
        return _check(_mpi(env, "mpich", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")))
    if env.get("PMIX_RANK", "") != "":
        return _check(_pmix(env, mpi_size))
    return RankInfo(0, 1, 0, 1, env.get("MASTER_ADDR", ""), _port(env), "single")


def device_index(local_rank: int, local_world: int, visible_gpus: int) -> int:
    """The CUDA device of this rank: its local rank when the node's GPUs are all visible; 0 when each
    rank sees exactly one (Slurm's ``--gpus-per-task=1`` or a per-rank CUDA_VISIBLE_DEVICES). More
    ranks than GPUs would put two ranks on one GPU: an error, not a silent modulo."""
    if visible_gpus >= local_world:
        return local_rank
    if visible_gpus == 1:
        return 0
    raise LaunchEnvError(f"{local_world} ranks on this node but {visible_gpus} visible GPUs: start one rank per GPU "
                         f"(--nproc-per-node {visible_gpus}) or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
