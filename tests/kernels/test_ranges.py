"""kernels/ranges.py: per-token visible ranges cover every visible pair, and are tight when tokens are sorted."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels.ranges import key_ranges, query_ranges


def _meta(lens, order=None):
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens])
    return (doc, pos) if order is None else (doc[order], pos[order])


CASES = {
    "sorted": lambda g: (_meta([5, 9, 1, 7]), _meta([5, 9, 1, 7])),
    "q shard of sorted keys": lambda g: ((lambda d, p: (d[::3], p[::3]))(*_meta([12, 9])), _meta([12, 9])),
    "keys shuffled": lambda g: (_meta([6, 8, 3]), _meta([6, 8, 3], torch.randperm(17, generator=g))),
    "queries shuffled": lambda g: (_meta([6, 8, 3], torch.randperm(17, generator=g)), _meta([6, 8, 3])),
    "docs sorted, positions reversed": lambda g: (_meta([6, 8]), (lambda d, p: (d, p.flip(0).sort().values.flip(0)))(*_meta([6, 8]))),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_ranges_cover_every_visible_pair(name, causal):
    (qd, qp), (kd, kp) = CASES[name](torch.Generator().manual_seed(0))
    vis = qd[:, None] == kd[None, :]
    if causal:
        vis &= kp[None, :] <= qp[:, None]
    i, j = torch.nonzero(vis, as_tuple=True)
    klo, khi = key_ranges(qd, qp, kd, kp, causal)
    qlo, qhi = query_ranges(qd, qp, kd, kp, causal)
    assert ((klo[i] <= j) & (j < khi[i])).all() and ((qlo[j] <= i) & (i < qhi[j])).all()
    if name == "sorted":  # tight: exactly the visible keys / queries of each token
        assert torch.equal(khi - klo, vis.sum(1)) and torch.equal(qhi - qlo, vis.sum(0))
    if name == "keys shuffled":
        assert (klo == 0).all() and (khi == kd.numel()).all()


def test_empty_sides_give_empty_ranges():
    none = torch.zeros(0, dtype=torch.long)
    some = torch.zeros(3, dtype=torch.long)
    assert key_ranges(none, none, some, some, True)[0].shape == (0,)
    lo, hi = key_ranges(some, some, none, none, True)
    assert (lo == hi).all()
