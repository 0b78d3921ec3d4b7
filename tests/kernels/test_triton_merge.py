"""The fused in-place Triton merge equals the torch reference merge (the oracle), including
rows where one side or both sides saw no key (lse = -inf) and large |lse|."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import reference
from seqpar.kernels import triton_attn as ta

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or ta.interpreting()),
    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 at import (tests/conftest.py sets it on CPU)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _partials(t: int, heads: int, dim: int, seed: int, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(t, heads, dim, generator=g)
    lse = torch.randn(heads, t, generator=g) * 3 + offset
    return out, lse


@pytest.mark.parametrize("t,heads,dim,offset", [(37, 3, 16, 0.0), (64, 2, 20, 1e3), (5, 1, 64, -40.0)])
def test_fused_merge_matches_reference(t, heads, dim, offset):
    from seqpar.kernels.triton_merge import merge_

    out_a, lse_a = _partials(t, heads, dim, 0, offset)
    out_b, lse_b = _partials(t, heads, dim, 1, offset)
    lse_a[0, 1::4] = float("-inf")  # a saw nothing
    lse_b[-1, 2::4] = float("-inf")  # b saw nothing
    lse_a[:, 3], lse_b[:, 3] = float("-inf"), float("-inf")  # neither: out 0, lse -inf
    out_a[lse_a.t() == float("-inf")] = 0.0  # what a kernel writes for an empty row
    out_b[lse_b.t() == float("-inf")] = 0.0
    ref_out, ref_lse = reference.merge(out_a, lse_a, out_b, lse_b)
    run = [x.to(DEVICE).contiguous() for x in (out_a, lse_a, out_b, lse_b)]
    got_out, got_lse = merge_(*run)
    assert got_out.data_ptr() == run[0].data_ptr() and got_lse.data_ptr() == run[1].data_ptr(), "not in place"
    got_out, got_lse = got_out.cpu(), got_lse.cpu()
    assert torch.equal(torch.isinf(got_lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (got_lse[finite] - ref_lse[finite]).abs().max() <= 1e-6 * max(1.0, abs(offset))
    assert (got_out - ref_out).abs().max() <= 1e-6
    assert not torch.isnan(got_out).any()
    assert (got_out[3] == 0).all()


def test_fused_merge_rejects_bad_inputs():
    from seqpar.kernels.triton_merge import merge_

    out, lse = _partials(4, 2, 8, 0)
    with pytest.raises(ValueError, match="must be fp32"):
        merge_(out.double(), lse, out, lse)
    with pytest.raises(ValueError, match=r"\[T, H, D\] twice"):
        merge_(out, lse[:, :2], out, lse)
