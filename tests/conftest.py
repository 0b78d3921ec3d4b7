import glob
import os
import sysconfig

import pytest
import torch

from tests.support.dist import PoolFactory

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this when a
# kernel is decorated (at import), so it must be set before anything imports seqpar.kernels.triton_*;
# spawned test ranks inherit it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests must never pick up a user's cache or write into the home directory.
os.environ.setdefault("SEQPAR_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "seqpar-cache"))


@pytest.fixture(scope="session")
def dist_pool():
    """dist_pool(world_size) -> a DistPool of that many gloo ranks, shared by the session."""
    factory = PoolFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> str:
    """A small byte-level store (~1,500 documents' worth of tokens from two stdlib packages) made by `prepare`."""
    from seqpar.data.prepare import prepare

    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "json", "*.py")) + glob.glob(os.path.join(root, "email", "*.py")))
    prefix = str(tmp_path_factory.mktemp("store") / "small")
    prepare(files, prefix, "byte", progress=False)
    return prefix
