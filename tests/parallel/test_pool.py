"""The group pool: its shapes and process groups (pure), and the groups it creates on gloo ranks.

The distributed cases run many checks inside one function per world size (spawning is slow);
every group's membership is proved by an all-reduce of the members' global ranks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from seqpar.parallel.pool import (
    GroupPool,
    GroupShape,
    adaptive_shapes,
    pool_group_count,
    process_groups_needed,
    static_shapes,
)

# --- pure ------------------------------------------------------------------------------------


def test_group_shape_properties_and_validation():
    s = GroupShape(4, 8, 2)
    assert (s.ring, s.ranks) == (4, range(4, 12))
    assert s.ulysses_subgroups() == [(4, 5), (6, 7), (8, 9), (10, 11)]
    assert s.ring_subgroups() == [(4, 6, 8, 10), (5, 7, 9, 11)]
    for bad in [(0, 0, 1), (-1, 2, 1), (0, 4, 0), (0, 6, 4)]:
        with pytest.raises(ValueError, match="bad group shape") as e:
            GroupShape(*bad)
        assert "\n" not in str(e.value)


def test_adaptive_shapes_at_four_ranks():
    got = [(s.first, s.degree, s.ulysses) for s in adaptive_shapes(4)]
    assert got == [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1),
                   (0, 2, 1), (0, 2, 2), (2, 2, 1), (2, 2, 2),
                   (0, 4, 1), (0, 4, 2), (0, 4, 4)]
    assert adaptive_shapes(4) == adaptive_shapes(4)  # deterministic


def test_adaptive_shapes_are_aligned_at_a_non_power_of_two_world():
    shapes = adaptive_shapes(6)
    assert {(s.first, s.degree) for s in shapes if s.degree >= 2} == {(0, 2), (2, 2), (4, 2), (0, 4)}
    assert all(s.first % s.degree == 0 and s.first + s.degree <= 6 for s in shapes)


def test_process_groups_needed_at_four_ranks():
    # The hybrid 2 x 2 of ranks 0-3 needs its Ulysses subgroups (0, 1), (2, 3): they are the
    # aligned flat groups of degree 2, listed once. Its ring subgroups are strided.
    assert process_groups_needed(adaptive_shapes(4)) == [(0, 1), (2, 3), (0, 1, 2, 3), (0, 2), (1, 3)]
    assert process_groups_needed(adaptive_shapes(2)) == [(0, 1)]
    assert process_groups_needed(adaptive_shapes(1)) == []


def test_process_groups_needed_deduplicates_and_skips_trivial_subgroups():
    # pure ring / pure Ulysses: the subgroup that spans the shape is the flat group itself
    assert process_groups_needed([GroupShape(0, 4, 1), GroupShape(0, 4, 4)]) == [(0, 1, 2, 3)]
    assert process_groups_needed([GroupShape(0, 4, 2), GroupShape(0, 4, 2), GroupShape(0, 2, 2)]) == [
        (0, 1, 2, 3), (0, 1), (2, 3), (0, 2), (1, 3)]
    needed = process_groups_needed(adaptive_shapes(16))
    assert len(needed) == len(set(needed)) and all(list(g) == sorted(g) for g in needed)


def test_static_shapes_with_non_power_of_two_sp():
    assert static_shapes(2, 3, 1) == [GroupShape(0, 3, 1), GroupShape(3, 3, 1)]
    assert process_groups_needed(static_shapes(2, 3, 1)) == [(0, 1, 2), (3, 4, 5)]
    # sp = 6 = Ulysses 2 x ring 3
    assert process_groups_needed(static_shapes(1, 6, 2)) == [
        (0, 1, 2, 3, 4, 5), (0, 1), (2, 3), (4, 5), (0, 2, 4), (1, 3, 5)]
    assert process_groups_needed(static_shapes(1, 6, 3)) == [
        (0, 1, 2, 3, 4, 5), (0, 1, 2), (3, 4, 5), (0, 3), (1, 4), (2, 5)]
    assert process_groups_needed(static_shapes(4, 1, 1)) == []


def test_pool_size_is_w_log_w():
    # W = 2^n: W - 1 flat groups; a group of degree d has ring subgroups for each split 1 < u < d,
    # u of them (sum d - 2), and its Ulysses subgroups are flat groups. Summed over the W/d groups
    # of each degree: W (n - 1) + 1.
    assert pool_group_count(64) == 64 * 5 + 1 == 321
    assert pool_group_count(1024) == 1024 * 9 + 1 == 9217
    for w in (2, 4, 8, 16, 32):
        assert pool_group_count(w) == w * (int(math.log2(w)) - 1) + 1
    for w in (64, 1024, 96, 1000):
        assert pool_group_count(w) <= w * math.log2(w)


# --- distributed -----------------------------------------------------------------------------


def _sum_of_ranks(pg) -> float:
    t = torch.tensor([float(dist.get_rank())], dtype=torch.float64)
    dist.all_reduce(t, group=pg)
    return t.item()


def _check_pool(pool: GroupPool) -> int:
    """Every pool shape containing this rank: sizes, ranks and members of its groups follow the
    hybrid convention (SP rank = ring_index * ulysses + ulysses_index). Collective (all-reduces
    over every group, in pool order on every rank). Returns the number of shapes checked."""
    rank = dist.get_rank()
    checked = 0
    for s in pool.shapes:
        if rank not in s.ranks:
            continue
        g = pool.get(s.first, s.degree, s.ulysses)
        assert g is pool.get(s.first, s.degree, s.ulysses)  # one view per shape
        index = rank - s.first
        ring_index, uly_index = divmod(index, s.ulysses)
        assert (g.shape, g.rank, g.degree, g.ulysses_degree, g.ring_degree) == (s, index, s.degree, s.ulysses, s.ring)
        if s.degree == 1:
            assert g.sp is g.ulysses is g.ring is None
        else:
            assert (dist.get_world_size(g.sp), dist.get_rank(g.sp)) == (s.degree, index), s
            assert _sum_of_ranks(g.sp) == sum(s.ranks), s
        if s.ulysses == 1:
            assert g.ulysses is None
        else:
            if s.ulysses == s.degree:
                assert g.ulysses is g.sp
            assert (dist.get_world_size(g.ulysses), dist.get_rank(g.ulysses)) == (s.ulysses, uly_index), s
            members = [s.first + ring_index * s.ulysses + i for i in range(s.ulysses)]
            assert _sum_of_ranks(g.ulysses) == sum(members), s
        if s.ring == 1:
            assert g.ring is None
        else:
            if s.ring == s.degree:
                assert g.ring is g.sp
            assert (dist.get_world_size(g.ring), dist.get_rank(g.ring)) == (s.ring, ring_index), s
            members = [s.first + uly_index + j * s.ulysses for j in range(s.ring)]
            assert _sum_of_ranks(g.ring) == sum(members), s
        checked += 1
    return checked


def _one_line_error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    raise AssertionError("no ValueError")


def _adaptive_pool_case() -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    pool = GroupPool.build(adaptive_shapes(world))
    needed = process_groups_needed(adaptive_shapes(world))
    assert pool.count == len(needed) == pool_group_count(world)
    assert pool.local_count == sum(rank in g for g in needed)
    assert pool.shapes_of_rank() == [s for s in adaptive_shapes(world) if rank in s.ranks]
    checked = _check_pool(pool)
    assert checked == len(pool.shapes_of_rank())
    # lookups: a shape outside the pool, a shape this rank is not in, an invalid shape
    assert "bad group shape" in _one_line_error(lambda: pool.get(0, world, 2 * world))
    assert "is not in the group pool" in _one_line_error(lambda: pool.get(1, 2, 1))  # not aligned
    other = 0 if rank >= world // 2 else world // 2
    assert f"rank {rank} is not a member" in _one_line_error(lambda: pool.get(other, world // 2, 1))
    dist.barrier()
    return {"count": pool.count, "local_count": pool.local_count, "creation_s": pool.creation_s,
            "describe": pool.describe()}


@pytest.mark.parametrize("world", [2, 4, 8])
def test_adaptive_pool_groups_on_gloo(dist_pool, world):
    results = dist_pool(world).run(_adaptive_pool_case)
    assert {r["count"] for r in results} == {pool_group_count(world)}
    # every group counted once per member
    assert sum(r["local_count"] for r in results) == sum(map(len, process_groups_needed(adaptive_shapes(world))))
    assert results[0]["describe"].startswith(f"group pool: {pool_group_count(world)} groups (")
    print(f"\nW={world}: " + "; ".join(f"rank {i}: {r['describe']}" for i, r in enumerate(results)))


def _static_and_mesh_case() -> list[str]:
    """At 8 ranks: static pools with non-power-of-two SP degrees, then build_groups of several layouts."""
    from seqpar.parallel.dims import ParallelDims
    from seqpar.parallel.mesh import build_groups

    world, rank = dist.get_world_size(), dist.get_rank()
    # sp = 3 (ranks 6, 7 in no group) and sp = 6 = Ulysses 2 x ring 3 or Ulysses 3 x ring 2. Ranks
    # 6, 7 then hold fewer groups than the others, yet the later groups that mix them with ranks
    # 0-5 must still form: members-only creation (hashed names) would hang here.
    for shapes in (static_shapes(2, 3, 1), static_shapes(1, 6, 2), static_shapes(1, 6, 3)):
        pool = GroupPool.build(shapes)
        assert pool.count == len(process_groups_needed(shapes))
        _check_pool(pool)
    done = []
    for dp, u, r in [(2, 2, 2), (4, 1, 2), (1, 4, 2), (1, 8, 1), (8, 1, 1), (2, 4, 1)]:
        dims = ParallelDims(dp, u * r, u, r, world)
        g = build_groups(dims, "cpu")
        c = dims.coordinates(rank)
        sp = dims.sp
        assert g.sp_group.shape == GroupShape(c["dp"] * sp, sp, u)
        assert g.sp_group.rank == c["sp"] == g.sp_rank
        for pg, size, index, members in [
            (g.sp, sp, c["sp"], range(c["dp"] * sp, (c["dp"] + 1) * sp)),
            (g.ulysses, u, c["ulysses"], [c["dp"] * sp + c["ring"] * u + i for i in range(u)]),
            (g.ring, r, c["ring"], [c["dp"] * sp + c["ulysses"] + j * u for j in range(r)]),
            (g.dp, dp, c["dp"], [c["sp"] + k * sp for k in range(dp)]),
            (g.dp_sp, world, rank, range(world)),
        ]:
            assert (dist.get_world_size(pg), dist.get_rank(pg)) == (size, index), (dims.describe(), members)
            assert _sum_of_ranks(pg) == sum(members), (dims.describe(), members)
        assert g.dp_rank == c["dp"]
        assert g.dp_sp_mesh.ndim == 1 and g.dp_sp_mesh.mesh_dim_names == ("dp_sp",)
        assert g.dp_sp_mesh.size() == world
        done.append(dims.describe())
    return done


def test_static_pools_and_build_groups_on_gloo(dist_pool):
    results = dist_pool(8).run(_static_and_mesh_case)
    assert len(results[0]) == 6 and all(r == results[0] for r in results)
