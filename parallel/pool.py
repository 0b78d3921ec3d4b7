"""The group pool: every process group sequence parallelism may use, created once at start-up.

    pool = GroupPool.build(adaptive_shapes(world))      # collective over the default group
    g = pool.get(first=4, degree=4, ulysses=2)          # this rank's view: g.sp, g.ulysses, g.ring
    log.info(pool.describe())                           # "group pool: 17 groups (7 on this rank), ..."

A shape is ``degree`` consecutive ranks from ``first``, split ``ulysses x ring``: Ulysses over
adjacent ranks, ring over ranks strided by ``ulysses``. Inside a group, SP rank
``s = ring_index * ulysses + ulysses_index`` (the convention of ``seqpar.attention.hybrid``);
groups are created with their ranks sorted, so ``dist.get_rank(ulysses_pg) == ulysses_index`` and
``dist.get_rank(ring_pg) == ring_index``.

Adaptive scattering (``specs/adaptive-scattering.md``) lays groups on aligned power-of-two runs of
ranks with any power-of-two Ulysses split; static SP is the special case of one shape per dp
replica. The pure functions below list the shapes and the process groups they need, so the
pool's size (``W (log2 W - 1) + 1`` at a power-of-two W) is tested without spawning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupShape:
    """``degree`` consecutive global ranks from ``first``, run as Ulysses ``ulysses`` x ring ``degree // ulysses``."""

    first: int
    degree: int
    ulysses: int

    def __post_init__(self) -> None:
        if self.first < 0 or self.degree < 1 or self.ulysses < 1 or self.degree % self.ulysses:
            raise ValueError(f"bad group shape first={self.first} degree={self.degree} ulysses={self.ulysses}: "
                             "need first >= 0, degree >= 1 and ulysses >= 1 dividing degree")

    @property
    def ring(self) -> int:
        return self.degree // self.ulysses

    @property
    def ranks(self) -> range:
        return range(self.first, self.first + self.degree)

    def ulysses_subgroups(self) -> list[tuple[int, ...]]:
        """Adjacent runs ``first + j*u .. first + j*u + u - 1`` for ring index j (global ranks)."""
        u = self.ulysses
        return [tuple(range(self.first + j * u, self.first + (j + 1) * u)) for j in range(self.ring)]

    def ring_subgroups(self) -> list[tuple[int, ...]]:
        """Strided ``first + i + j*u`` (j < ring) for Ulysses index i (global ranks)."""
        u = self.ulysses
        return [tuple(self.first + i + j * u for j in range(self.ring)) for i in range(u)]

    def __str__(self) -> str:
        return f"group(first={self.first}, degree={self.degree}, ulysses={self.ulysses} x ring={self.ring})"


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... <= limit: the degrees an aligned group can have (the planner's candidates too)."""
    out, d = [], 1
    while d <= limit:
        out.append(d)
        d *= 2
    return out


def adaptive_shapes(world: int) -> list[GroupShape]:
    """Every aligned power-of-two run of ranks with every power-of-two Ulysses split (pure).

    Ordered by degree, then first rank, then Ulysses degree (1 = pure ring, degree = pure Ulysses).
    """
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    return [GroupShape(first, d, u)
            for d in powers_of_two(world)
            for first in range(0, world - d + 1, d)
            for u in powers_of_two(d)]


def static_shapes(dp: int, sp: int, ulysses: int) -> list[GroupShape]:
    """Static SP: one group of ``sp`` consecutive ranks per dp replica, split ``ulysses x sp/ulysses`` (pure)."""
    if dp < 1:
        raise ValueError(f"dp={dp} must be >= 1")
    return [GroupShape(k * sp, sp, ulysses) for k in range(dp)]


def process_groups_needed(shapes: Sequence[GroupShape]) -> list[tuple[int, ...]]:
    """Global-rank tuples of every process group ``shapes`` need, ordered, without duplicates (pure).

    Per shape: its flat group (degree >= 2), its Ulysses subgroups (1 < ulysses < degree) and its
    ring subgroups (1 < ring < degree). The subgroups equal to the flat group, and one-rank ones,
    are not separate groups. A group needed twice (e.g. a Ulysses subgroup that is also an aligned
    flat group) appears once, at its first use.
    """
    seen: dict[tuple[int, ...], None] = {}  # insertion-ordered set
    for s in shapes:
        if s.degree >= 2:
            seen.setdefault(tuple(s.ranks))
        if 1 < s.ulysses < s.degree:
            for g in s.ulysses_subgroups():
                seen.setdefault(g)
        if 1 < s.ring < s.degree:
            for g in s.ring_subgroups():
                seen.setdefault(g)
    return list(seen)


def pool_group_count(world: int) -> int:
    """Process groups of the adaptive pool at ``world`` ranks (pure); ``W (log2 W - 1) + 1`` at a power of two.

    Why: W - 1 flat groups (W/d of each degree d >= 2), plus, per group of degree d, the ring
    subgroups of its splits 1 < u < d: u each, sum = d - 2; Ulysses subgroups are flat groups.
    """
    return len(process_groups_needed(adaptive_shapes(world)))


@dataclass(frozen=True)
class SPGroup:
    """One rank's view of one pool group: the shape, this rank's index in it, and its process groups."""

    shape: GroupShape
    rank: int  # this rank's index in the group: global rank - shape.first
    sp: dist.ProcessGroup | None  # all shape.degree ranks (None when degree == 1)
    ulysses: dist.ProcessGroup | None  # this rank's Ulysses subgroup (sp when ulysses == degree; None when 1)
    ring: dist.ProcessGroup | None  # this rank's ring subgroup (sp when ring == degree; None when 1)

    @property
    def degree(self) -> int:
        return self.shape.degree

    @property
    def ulysses_degree(self) -> int:
        return self.shape.ulysses

    @property
    def ring_degree(self) -> int:
        return self.shape.ring


class GroupPool:
    """The process groups of a set of shapes, created once; ``get`` returns this rank's view of one."""

    def __init__(self, shapes: Sequence[GroupShape], groups: dict[tuple[int, ...], dist.ProcessGroup],
                 count: int, creation_s: float, rank: int) -> None:
        self.shapes: tuple[GroupShape, ...] = tuple(dict.fromkeys(shapes))
        self._shape_set = frozenset(self.shapes)
        self._groups = groups  # only the groups this rank is a member of
        self._views: dict[GroupShape, SPGroup] = {}
        self.rank = rank
        self.count = count
        self.local_count = len(groups)
        self.creation_s = creation_s

    @classmethod
    def build(cls, shapes: Sequence[GroupShape]) -> GroupPool:
        """Create every process group of ``process_groups_needed(shapes)`` once, in that order.

        Collective over the default group: every rank calls it with the same shapes, in the same
        order relative to its other ``new_group`` calls.

        Every rank calls ``new_group`` for every group, not only its members. Why not
        ``use_local_synchronization=True`` (members only): checked on gloo with torch 2.13, it works
        only while every member of a group has registered the same number of process groups
        before: the group's store prefix is a hash of (ranks, len of this process's group
        registry), and non-members of earlier groups do not register them. Members with different
        histories (an earlier pool, the dp groups, a non-power-of-two layout) then wait under
        different prefixes until the timeout. Counter-named groups stay in step because every rank
        counts every group; a non-member's call returns at once (no barrier unless
        TORCH_DIST_INIT_BARRIER=1), so this costs Python calls, not communication.
        """
        rank = dist.get_rank()
        world = dist.get_world_size()
        needed = process_groups_needed(shapes)
        for s in shapes:
            if s.first + s.degree > world:
                raise ValueError(f"{s} needs ranks up to {s.first + s.degree - 1} but the world has {world} ranks")
        t0 = time.perf_counter()
        groups = {}
        for ranks in needed:
            pg = dist.new_group(list(ranks))  # ranks ascending: group rank == index in the tuple
            if rank in ranks:
                groups[ranks] = pg
        pool = cls(shapes, groups, len(needed), time.perf_counter() - t0, rank)
        logger.debug(pool.describe())
        return pool

    def get(self, first: int, degree: int, ulysses: int) -> SPGroup:
        """This rank's view of pool group (first, degree, ulysses); not collective."""
        shape = GroupShape(first, degree, ulysses)
        if shape not in self._shape_set:
            raise ValueError(f"{shape} is not in the group pool ({len(self.shapes)} shapes); "
                             "build the pool with it at start-up")
        if self.rank not in shape.ranks:
            raise ValueError(f"rank {self.rank} is not a member of {shape}; look up a group this rank belongs to")
        view = self._views.get(shape)
        if view is None:
            view = self._views[shape] = self._view(shape)
        return view

    def _view(self, shape: GroupShape) -> SPGroup:
        index = self.rank - shape.first
        ring_index, ulysses_index = divmod(index, shape.ulysses)
        sp = self._groups[tuple(shape.ranks)] if shape.degree > 1 else None
        if shape.ulysses == 1:
            uly = None
        elif shape.ulysses == shape.degree:
            uly = sp
        else:
            uly = self._groups[shape.ulysses_subgroups()[ring_index]]
        if shape.ring == 1:
            ring = None
        elif shape.ring == shape.degree:
            ring = sp
        else:
            ring = self._groups[shape.ring_subgroups()[ulysses_index]]
        return SPGroup(shape=shape, rank=index, sp=sp, ulysses=uly, ring=ring)

    def shapes_of_rank(self, rank: int | None = None) -> list[GroupShape]:
        """The pool's shapes that contain global ``rank`` (default: this rank), in pool order."""
        r = self.rank if rank is None else rank
        return [s for s in self.shapes if r in s.ranks]

    def describe(self) -> str:
        """One line for the start-up log."""
        return (f"group pool: {self.count} groups ({self.local_count} on this rank), "
                f"created in {self.creation_s:.2f} s")
