import pytest

from seqpar.parallel.dims import ParallelDims, ParallelDimsError


def test_dp_fills_world():
    d = ParallelDims(dp=-1, sp=4, ulysses=2, ring=2, world_size=8)
    assert d.dp == 2 and d.mesh_shape == (2, 2, 2)
    # Ulysses adjacent, ring strided by ulysses, dp outermost.
    assert d.coordinates(0) == {"dp": 0, "ring": 0, "ulysses": 0, "sp": 0}
    assert d.coordinates(1) == {"dp": 0, "ring": 0, "ulysses": 1, "sp": 1}
    assert d.coordinates(2) == {"dp": 0, "ring": 1, "ulysses": 0, "sp": 2}
    assert d.coordinates(5) == {"dp": 1, "ring": 0, "ulysses": 1, "sp": 1}


def test_degrees_not_matching_world_size():
    with pytest.raises(ParallelDimsError, match=r"parallel.dp\(2\) x parallel.sp\(2\) = 4 must equal the world size 2"):
        ParallelDims(dp=2, sp=2, ulysses=1, ring=2, world_size=2)
    with pytest.raises(ParallelDimsError, match="world size 6 is not divisible by parallel.sp=4"):
        ParallelDims(dp=-1, sp=4, ulysses=4, ring=1, world_size=6)
    with pytest.raises(ParallelDimsError, match=r"parallel.sp=4 must equal ulysses\(2\) x ring\(3\) = 6"):
        ParallelDims(dp=1, sp=4, ulysses=2, ring=3, world_size=4)
