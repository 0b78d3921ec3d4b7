"""The static groups of a run and the explicit groups object handed to the core (no module-level group state).

Rank layout (outermost first): ``dp x ring x ulysses`` (``ParallelDims.coordinates``). The SP
groups come from the group pool (``seqpar.parallel.pool``), so static SP and adaptive plans use
the same kind of group; dp x sp is the whole world, so FSDP's mesh is the 1-D world mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from seqpar.parallel.dims import ParallelDims
from seqpar.parallel.pool import GroupPool, GroupShape, SPGroup, static_shapes


@dataclass
class Groups:
    """Process groups of one rank. Collective ops in the core take these as ``group=`` arguments.

    dp: ranks holding the same sequence shard of different batches (strided by sp); sp: the
    sequence-parallel group (ulysses x ring); ulysses: adjacent ranks of the all-to-all; ring:
    strided ranks of the P2P ring; world: everyone; dp_sp: dp x sp, i.e. the world (gradient
    reduction, FSDP sharding over ``dp_sp_mesh``). A degree of 1 gives this rank's one-rank group,
    so every field is a real group (``dist.get_rank`` / ``get_world_size`` work on each).
    sp_group: this rank's static SP group from ``pool`` (what an ``SPAssignment`` takes).
    """

    dims: ParallelDims
    dp: dist.ProcessGroup
    sp: dist.ProcessGroup
    ulysses: dist.ProcessGroup
    ring: dist.ProcessGroup
    dp_sp: dist.ProcessGroup
    world: dist.ProcessGroup
    dp_sp_mesh: DeviceMesh
    sp_group: SPGroup
    pool: GroupPool

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    @property
    def sp_rank(self) -> int:
        return dist.get_rank(self.sp)


def build_groups(dims: ParallelDims, device_type: str, extra_shapes: Sequence[GroupShape] = ()) -> Groups:
    """Create the run's static groups: the SP pool, the dp groups and the dp x sp mesh.

    Collective over the default group: every rank calls it, in the same order relative to its
    other group creations. device_type: "cuda" or "cpu" (gloo). The world size of the default
    group must match dims. extra_shapes: more pool shapes (adaptive scattering: every aligned
    group, ``adaptive_shapes(world)``), created in the same pool.
    """
    world = dist.get_world_size()
    if world != dims.world_size:
        raise ValueError(f"the process group has {world} ranks but the parallel dims were built for {dims.world_size}")
    rank = dist.get_rank()
    pool = GroupPool.build([*static_shapes(dims.dp, dims.sp, dims.ulysses), *extra_shapes])
    sp_group = pool.get(dims.coordinates(rank)["dp"] * dims.sp, dims.sp, dims.ulysses)

    # Only this rank is a member, so members-only creation is safe here (no peer can disagree on
    # the group's hashed name) and costs no call on the other ranks.
    own = None
    if 1 in (dims.dp, dims.ulysses, dims.ring):
        own = dist.new_group([rank], use_local_synchronization=True)

    world_pg = dist.group.WORLD
    if dims.dp == 1:
        dp = own
    elif dims.sp == 1:
        dp = world_pg
    else:
        # Strided {s + k sp}: every rank creates every one in the same order (see GroupPool.build for
        # why not members-only).
        dp = None
        for s in range(dims.sp):
            pg = dist.new_group([s + k * dims.sp for k in range(dims.dp)])
            if rank % dims.sp == s:
                dp = pg

    # dp x sp = world: the world mesh is the default group (no new group on CPU; no _flatten).
    dp_sp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp_sp",))
    return Groups(
        dims=dims,
        dp=dp,
        sp=_or(sp_group.sp, own),
        ulysses=_or(sp_group.ulysses, own),
        ring=_or(sp_group.ring, own),
        dp_sp=dp_sp_mesh.get_group(),
        world=world_pg,
        dp_sp_mesh=dp_sp_mesh,
        sp_group=sp_group,
        pool=pool,
    )


def _or(pg: dist.ProcessGroup | None, own: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return own if pg is None else pg
