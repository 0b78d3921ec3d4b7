"""Device mesh and the explicit groups object handed to the core (no module-level group state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from seqpar.parallel.dims import ParallelDims


@dataclass
class Groups:
    """Process groups of one rank. Collective ops in the core take these as ``group=`` arguments.

    dp: ranks holding the same sequence shard of different batches; sp: the sequence-parallel
    group (ulysses x ring); ulysses: adjacent ranks of the all-to-all; ring: strided ranks of the
    P2P ring; world: everyone; dp_sp: flattened dp x sp (gradient reduction, FSDP sharding).
    """

    dims: ParallelDims
    mesh: DeviceMesh
    dp: dist.ProcessGroup
    sp: dist.ProcessGroup
    ulysses: dist.ProcessGroup
    ring: dist.ProcessGroup
    dp_sp: dist.ProcessGroup
    world: dist.ProcessGroup
    dp_sp_mesh: DeviceMesh

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    @property
    def sp_rank(self) -> int:
        return dist.get_rank(self.sp)


def build_groups(dims: ParallelDims, device_type: str) -> Groups:
    """Create the mesh ``dp x ring x ulysses`` and its groups (collective: every rank calls it).

    device_type: "cuda" or "cpu" (gloo). The world size of the default group must match dims.
    """
    world = dist.get_world_size()
    if world != dims.world_size:
        raise ValueError(f"the process group has {world} ranks but the parallel dims were built for {dims.world_size}")
    mesh = init_device_mesh(device_type, dims.mesh_shape, mesh_dim_names=dims.mesh_dim_names)
    sp_mesh = mesh["ring", "ulysses"]._flatten("sp")
    dp_sp_mesh = mesh["dp", "ring", "ulysses"]._flatten("dp_sp")
    return Groups(
        dims=dims,
        mesh=mesh,
        dp=mesh.get_group("dp"),
        sp=sp_mesh.get_group(),
        ulysses=mesh.get_group("ulysses"),
        ring=mesh.get_group("ring"),
        dp_sp=dp_sp_mesh.get_group(),
        world=dist.group.WORLD,
        dp_sp_mesh=dp_sp_mesh,
    )
