"""Parallel degrees of a run, validated against the world size (pure: no processes).

Layout of ranks (outermost first): ``dp x ring x ulysses``. Ulysses ranks are adjacent so its
all-to-all stays inside a node; ring ranks are strided by ``ulysses``; ``sp = ulysses x ring``.
"""

from __future__ import annotations

from dataclasses import dataclass


class ParallelDimsError(ValueError):
    """Degrees that do not fit together or do not match the world size."""


def ulysses_head_error(heads: int, kv_heads: int, ulysses: int) -> str | None:
    """The one head rule of Ulysses (specs/sequence-parallel.md), or None when it holds.

    Query heads are split over the ``ulysses`` ranks, so heads % ulysses == 0; KV heads are either
    split (kv_heads % ulysses == 0) or replicated inside the exchange (ulysses % kv_heads == 0).
    The config check, the attention function and the adaptive planner all ask this function.
    """
    if heads % ulysses:
        return (f"Ulysses degree {ulysses} must divide the number of attention heads {heads} (model.n_heads={heads}, "
                f"parallel.ulysses={ulysses}): Ulysses splits query heads over its ranks; choose parallel.ulysses "
                f"dividing {heads} (and put the rest of sp in parallel.ring)")
    if kv_heads % ulysses and ulysses % kv_heads:
        return (f"Ulysses degree {ulysses} and kv_heads {kv_heads}: one must divide the other to split or replicate KV "
                f"heads (model.n_kv_heads={kv_heads}, parallel.ulysses={ulysses}); change one of them")
    return None


@dataclass(frozen=True)
class ParallelDims:
    """Validated parallel degrees.

    dp: data-parallel degree (-1 fills the world size); sp: sequence-parallel degree;
    ulysses, ring: the two factors of sp (all-to-all over adjacent ranks, P2P over strided ranks).
    """

    dp: int
    sp: int
    ulysses: int
    ring: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("sp", "ulysses", "ring", "world_size"):
            if getattr(self, name) < 1:
                raise ParallelDimsError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.sp != self.ulysses * self.ring:
            raise ParallelDimsError(
                f"parallel.sp={self.sp} must equal ulysses({self.ulysses}) x ring({self.ring}) = {self.ulysses * self.ring}"
            )
        if self.dp == -1:
            if self.world_size % self.sp != 0:
                raise ParallelDimsError(
                    f"world size {self.world_size} is not divisible by parallel.sp={self.sp}; "
                    f"launch a multiple of {self.sp} processes or change parallel.sp"
                )
            object.__setattr__(self, "dp", self.world_size // self.sp)
        if self.dp < 1:
            raise ParallelDimsError(f"parallel.dp={self.dp} must be >= 1, or -1 to fill the world size")
        if self.dp * self.sp != self.world_size:
            raise ParallelDimsError(
                f"parallel.dp({self.dp}) x parallel.sp({self.sp}) = {self.dp * self.sp} must equal the world size "
                f"{self.world_size}; launch {self.dp * self.sp} processes (--nproc) or set parallel.dp=-1"
            )

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.dp, self.ring, self.ulysses)

    @property
    def mesh_dim_names(self) -> tuple[str, str, str]:
        return ("dp", "ring", "ulysses")

    def coordinates(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank: ``{"dp", "ring", "ulysses", "sp"}``."""
        if not 0 <= rank < self.world_size:
            raise ParallelDimsError(f"rank {rank} is outside the world of {self.world_size}")
        dp, rest = divmod(rank, self.sp)
        ring, uly = divmod(rest, self.ulysses)
        return {"dp": dp, "ring": ring, "ulysses": uly, "sp": rest}

    def describe(self) -> str:
        return f"world {self.world_size} = dp {self.dp} x sp {self.sp} (ulysses {self.ulysses} x ring {self.ring})"
