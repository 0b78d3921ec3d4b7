"""Worker-side code for the GPU-scale properties of SP attention (runs inside a DistPool).

Each function builds one packed stream on every rank, its layout and host metadata outside the
measured region (once per micro-batch in training), then measures one forward and backward of
ring, Ulysses or hybrid attention: the ring's event order, the host syncs it would cause on a
GPU, the collective launches, and the tensors autograd saves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from tests.support.dist import sp_groups


def _degrees(algo: str, world: int, ulysses: int) -> tuple[int, int]:
    return {"ring": (1, world), "ulysses": (world, 1), "hybrid": (ulysses, world // ulysses)}[algo]


def _setup(algo: str, seqlens: list[int], heads: int, kv_heads: int, causal: bool, dtype: torch.dtype,
           ulysses: int = 2, layout: str | None = None, head_dim: int = 8):
    """(attention fn of (q, k, v) -> out, leaves, dout) on this rank; metadata prebuilt on the host."""
    from seqpar.attention.hybrid import hybrid_attention
    from seqpar.attention.layout import build_layout
    from seqpar.attention.meta import StreamMeta
    from seqpar.attention.ring import ring_attention
    from seqpar.attention.ulysses import ulysses_attention

    world = dist.get_world_size()
    u, r = _degrees(algo, world, ulysses)
    groups = sp_groups(u, r)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    lay = build_layout(cu.numpy(), layout or ("contiguous" if algo == "ulysses" else "zigzag"), ulysses=u, ring=r)
    stream = StreamMeta(cu, lay, torch.device("cpu"))
    me = dist.get_rank(groups.sp)
    g = torch.Generator().manual_seed(0)
    t = sum(seqlens)
    full = [torch.randn(t, h, head_dim, generator=g) for h in (heads, kv_heads, kv_heads, heads)]
    leaves = [lay.shard(x, me).to(dtype).requires_grad_(True) for x in full[:3]]
    dout = lay.shard(full[3], me).to(dtype)
    ranks = [[i] for i in range(world)]
    metas = stream.blocks(ranks)

    def fn(q, k, v, impl):
        if algo == "ring":
            return ring_attention(q, k, v, metas, groups.sp, causal=causal, impl=impl, vis=stream.visibility(ranks, causal))[0]
        if algo == "ulysses":
            return ulysses_attention(q, k, v, metas, groups.sp, causal=causal, impl=impl, gathered=stream.block(list(range(world))))
        return hybrid_attention(q, k, v, stream, groups.ulysses, groups.ring, causal=causal, impl=impl)

    return fn, leaves, dout


def ring_trace(seqlens: list[int], causal: bool) -> list[tuple[str, str, int]]:
    """The ring's event trace (post / wait / compute per step) of one forward and backward."""
    from seqpar.parallel.comm import TRACE

    fn, leaves, dout = _setup("ring", seqlens, 4, 2, causal, torch.float32)
    with TRACE.capture() as events:
        fn(*leaves, "reference").backward(dout)
    return list(events)


@contextlib.contextmanager
def _oracle_paused(counter) -> Iterator[None]:
    """The torch reference kernel is the oracle and may synchronise: its calls are not counted."""
    from seqpar.kernels import reference

    saved = reference.block_attn_fwd, reference.block_attn_bwd

    def paused(f: Callable) -> Callable:
        def call(*a, **kw):
            with counter.paused():
                return f(*a, **kw)
        return call

    reference.block_attn_fwd, reference.block_attn_bwd = paused(saved[0]), paused(saved[1])
    try:
        yield
    finally:
        reference.block_attn_fwd, reference.block_attn_bwd = saved


def host_syncs(algo: str, impl: str, seqlens: list[int], heads: int, kv_heads: int, causal: bool) -> list[str]:
    """Sites of every op that would force a host sync on a GPU during one forward and backward,
    outside the reference kernel (the Triton host code and the CPU fast path are counted)."""
    from seqpar.bench.sync_check import SyncCounter

    fn, leaves, dout = _setup(algo, seqlens, heads, kv_heads, causal, torch.float32, head_dim=16)
    counter = SyncCounter()
    with _oracle_paused(counter), counter:
        fn(*leaves, impl).backward(dout)
    return counter.sites


def collective_launches(algo: str, seqlens: list[int], heads: int, kv_heads: int) -> dict[str, dict[str, int]]:
    """Calls and bytes per op name of one forward, then of one backward."""
    from seqpar.parallel.comm import COUNTERS

    fn, leaves, dout = _setup(algo, seqlens, heads, kv_heads, True, torch.float32)
    COUNTERS.reset()
    out = fn(*leaves, "reference")
    fwd = {"calls": dict(COUNTERS.calls), "bytes": dict(COUNTERS.bytes)}
    COUNTERS.reset()
    out.backward(dout)
    bwd = {"calls": dict(COUNTERS.calls), "bytes": dict(COUNTERS.bytes)}
    return {"fwd": fwd, "bwd": bwd}


def saved_outputs(dtype: str, seqlens: list[int]) -> dict:
    """Storages autograd saves in ring attention followed by an output projection (as in a layer).

    Returns the output's element count and element size, and the bytes of every saved storage
    holding that many elements other than q's: the output's copies (a fp32 copy kept inside
    attention would show up beside the input-dtype one the projection saves).
    """
    dt = getattr(torch, dtype)
    fn, leaves, dout = _setup("ring", seqlens, 4, 2, True, dt)
    wo = torch.nn.Linear(4 * 8, 4 * 8, bias=False).to(dt)
    skip = {p.untyped_storage().data_ptr() for p in wo.parameters()} | {leaves[0].untyped_storage().data_ptr()}
    seen: dict[int, tuple[int, int]] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = (st.nbytes(), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves, "reference")
        y = wo(out.reshape(out.shape[0], -1))
    y.backward(torch.ones_like(y))
    n = out.numel()
    return {"numel": n, "itemsize": out.element_size(), "out_ptr": out.untyped_storage().data_ptr(),
            "copies": {ptr: b for ptr, (b, e) in seen.items() if e == n}}


def _casting_merge(cast_lse: bool) -> Callable:
    """A merge that rounds the running partial result to bf16 at every ring step (the negative
    control of the error-growth test): what a ring that keeps its partials in the input dtype does."""
    from seqpar.kernels import reference

    exact = reference.merge

    def merge(out_a, lse_a, out_b, lse_b):
        out, lse = exact(out_a, lse_a, out_b, lse_b)
        out = out.to(torch.bfloat16).to(out.dtype)
        return out, (lse.to(torch.bfloat16).to(lse.dtype) if cast_lse else lse)

    return merge


def ring_rounding_errors(seqlens: list[int], heads: int, kv_heads: int, head_dim: int, cast: str | None) -> dict:
    """Squared-error sums and counts of bf16 ring attention against fp64 attention of the SAME
    bf16-rounded inputs (so input quantisation, which dominates a max error, cancels out and
    what remains is the arithmetic's rounding), with the exact merge (cast None) or a
    bf16-rounding one ("out" / "out+lse")."""
    from seqpar.attention.layout import build_layout
    from seqpar.attention.ring import ring_attn_varlen_func
    from seqpar.kernels import reference
    from tests.support.oracle import oracle_grads, oracle_varlen

    world = dist.get_world_size()
    groups = sp_groups(1, world)
    g = torch.Generator().manual_seed(0)
    t = sum(seqlens)
    q, k, v, dout = (torch.randn(t, h, head_dim, generator=g, dtype=torch.float64).to(torch.bfloat16)
                     for h in (heads, kv_heads, kv_heads, heads))
    scale = head_dim**-0.5
    truth = oracle_grads(q, k, v, dout, list(seqlens), True, scale, attn=oracle_varlen)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    lay = build_layout(cu.numpy(), "zigzag", ring=world)
    me = dist.get_rank(groups.sp)
    local = [lay.shard(x, me).requires_grad_(True) for x in (q, k, v)]
    saved = reference.merge
    if cast is not None:
        reference.merge = _casting_merge(cast_lse=cast == "out+lse")
    try:
        out = ring_attn_varlen_func(*local, cu, group=groups.sp, layout=lay, softmax_scale=scale)
        out.backward(lay.shard(dout, me))
    finally:
        reference.merge = saved
    ix = torch.as_tensor(lay.indices[me])
    result = {}
    for name, mine, ref in zip(("out", "dq", "dk", "dv"), (out.detach(), *(x.grad for x in local)),
                               (truth[0], *truth[2:])):
        diff = mine.double() - ref.index_select(0, ix)
        result[name] = (float((diff * diff).sum()), diff.numel())
    return result


def errors_with_merge(cases: list, cast: str | None) -> list[dict]:
    """run_cases with the exact fp32 merge (cast None) or a bf16-rounding one ("out" / "out+lse")."""
    from seqpar.kernels import reference
    from tests.attention.sp_cases import run_cases

    saved = reference.merge
    if cast is not None:
        reference.merge = _casting_merge(cast_lse=cast == "out+lse")
    try:
        return run_cases(cases)
    finally:
        reference.merge = saved
