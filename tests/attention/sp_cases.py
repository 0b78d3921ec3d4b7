"""Worker-side code for the sequence-parallel exactness tests (runs inside a DistPool).

A case names an algorithm, degrees, head counts, document lengths, causal flag and dtype. Each
rank builds the same global inputs from a seed, runs the distributed path on its shard, and
returns max errors of its shard against the fp64 oracle, beside the single-process error in
the same dtype (the MagiAttention-style baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tests.support.dist import sp_groups

from tests.support.oracle import _max_err, oracle_grads, oracle_varlen

_TRUTH: dict = {}


@dataclass(frozen=True)
class Case:
    algo: str  # ring | ulysses | hybrid
    seqlens: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 8
    causal: bool = True
    dtype: str = "float32"
    layout: str = "zigzag"
    ulysses: int = 1  # hybrid only
    seed: int = 0
    impl: str = "reference"  # kernels.attention for the distributed path and its single-process baseline

    def name(self) -> str:
        return (
            f"{self.algo}[{self.layout}{'' if self.algo != 'hybrid' else f' u{self.ulysses}'}] {list(self.seqlens)} "
            f"h{self.heads}/{self.kv_heads} {'causal' if self.causal else 'full'} {self.dtype} {self.impl}"
        )


def _inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    t = sum(case.seqlens)
    q = torch.randn(t, case.heads, case.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(t, case.kv_heads, case.head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(t, case.kv_heads, case.head_dim, generator=g, dtype=torch.float64)
    dout = torch.randn(t, case.heads, case.head_dim, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _truth(case: Case, q, k, v, dout, scale):
    """fp64 oracle (explicit softmax per document), cached across algorithms of the same inputs."""
    key = (case.seqlens, case.heads, case.kv_heads, case.head_dim, case.causal, case.seed)
    if key not in _TRUTH:
        _TRUTH.clear()
        _TRUTH[key] = oracle_grads(q, k, v, dout, list(case.seqlens), case.causal, scale, attn=oracle_varlen)
    return _TRUTH[key]


def _single(case: Case, q, k, v, dout, cu, scale, dtype):
    from seqpar.kernels.autograd import varlen_attention

    leaves = [x.to(dtype).requires_grad_(True) for x in (q, k, v)]
    out, lse = varlen_attention(*leaves, cu, causal=case.causal, scale=scale, impl=case.impl, return_lse=True)
    out.backward(dout.to(dtype))
    return out.detach(), lse, *(x.grad for x in leaves)


def run_case(case: Case) -> dict:
    from seqpar.attention.hybrid import hybrid_attn_varlen_func
    from seqpar.attention.layout import build_layout
    from seqpar.attention.ring import ring_attn_varlen_func
    from seqpar.attention.ulysses import ulysses_attn_varlen_func

    world = dist.get_world_size()
    dtype = getattr(torch, case.dtype)
    scale = case.head_dim**-0.5
    q, k, v, dout = _inputs(case)
    cu = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int32)
    truth = _truth(case, q, k, v, dout, scale)
    single = _single(case, q, k, v, dout, cu, scale, dtype)

    if case.algo == "hybrid":
        u, r = case.ulysses, world // case.ulysses
    elif case.algo == "ulysses":
        u, r = world, 1
    else:
        u, r = 1, world
    groups = sp_groups(u, r)
    layout = build_layout(cu.numpy(), case.layout, ulysses=u, ring=r)
    sp_rank = dist.get_rank(groups.sp)
    local = [layout.shard(x, sp_rank).to(dtype).requires_grad_(True) for x in (q, k, v)]
    kwargs = dict(layout=layout, causal=case.causal, softmax_scale=scale, return_lse=True, impl=case.impl)
    if case.algo == "ring":
        out, lse = ring_attn_varlen_func(*local, cu, group=groups.sp, **kwargs)
    elif case.algo == "ulysses":
        out, lse = ulysses_attn_varlen_func(*local, cu, group=groups.sp, **kwargs)
    else:
        out, lse = hybrid_attn_varlen_func(*local, cu, ulysses_group=groups.ulysses, ring_group=groups.ring, **kwargs)
    out.backward(layout.shard(dout, sp_rank).to(dtype))

    ix = torch.as_tensor(layout.indices[sp_rank])
    names = ("out", "lse", "dq", "dk", "dv")
    dist_vals = (out.detach(), lse, *(x.grad for x in local))
    result = {"tokens": int(ix.numel())}
    for name, mine, ref, one in zip(names, dist_vals, truth, single):
        dim = 1 if name == "lse" else 0
        ref_mine = ref.index_select(dim, ix)
        assert mine.shape == ref_mine.shape, (name, mine.shape, ref_mine.shape)
        assert mine.dtype == (torch.float32 if name == "lse" else dtype), (name, mine.dtype)
        result[name] = (_max_err(mine, ref_mine), _max_err(one, ref))
    return result


def run_cases(cases: list[Case]) -> list[dict]:
    return [run_case(c) for c in cases]
