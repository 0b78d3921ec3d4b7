"""Process groups, meshes and communication for seqpar (imports torch only)."""

from seqpar.parallel.dims import ParallelDims, ParallelDimsError
from seqpar.parallel.init import DistInfo, destroy_distributed, init_distributed

__all__ = ["ParallelDims", "ParallelDimsError", "DistInfo", "init_distributed", "destroy_distributed"]
