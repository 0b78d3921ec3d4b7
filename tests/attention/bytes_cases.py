"""Worker-side code for the communication-byte tests (runs inside a DistPool, on every rank).

A case names an algorithm, document lengths, head counts and dtype. Each rank shards the same
global inputs, runs the distributed forward and then the backward, and returns the bytes that
``seqpar.parallel.comm.COUNTERS`` recorded in each phase. With ``transport=True`` the
torch.distributed send primitives are wrapped too, and the bytes actually handed to them are
returned beside the counters.
"""

from __future__ import annotations

import math
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tests.support.dist import sp_groups



@dataclass(frozen=True)
class ByteCase:
    algo: str  # ring | ulysses | hybrid
    seqlens: tuple[int, ...]
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 8
    dtype: str = "float32"
    ulysses: int = 1  # hybrid only: the Ulysses degree (ring = world / ulysses)
    layout: str = "zigzag"
    causal: bool = True
    return_lse: bool = False  # Ulysses then also sends lse back to the token layout (fp32)

    def degrees(self, world: int) -> tuple[int, int]:
        """(ulysses, ring) of the SP group of ``world`` ranks."""
        if self.algo == "ring":
            return 1, world
        if self.algo == "ulysses":
            return world, 1
        return self.ulysses, world // self.ulysses

    def name(self) -> str:
        deg = f" u{self.ulysses}" if self.algo == "hybrid" else ""
        return (
            f"{self.algo}{deg} {self.layout} {list(self.seqlens)} h{self.heads}/{self.kv_heads} d{self.head_dim} "
            f"{self.dtype}{'' if self.causal else ' full'}{' lse' if self.return_lse else ''}"
        )


class _Transport:
    """Bytes handed to torch.distributed's send primitives while installed (see :func:`_wrap_transport`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.p2p = 0
        self.a2a = 0


@contextmanager
def _wrap_transport(rec: _Transport):
    """Wrap ``dist.batch_isend_irecv`` and ``dist.all_to_all_single`` to count what they are given.

    P2P: the bytes of every tensor in an isend op. All-to-all: the input's bytes minus the rows
    this rank keeps (its own split), which never leave the process.
    """
    real_batch, real_a2a = dist.batch_isend_irecv, dist.all_to_all_single

    def batch_isend_irecv(p2p_op_list):
        for op in p2p_op_list:
            if op.op is dist.isend or getattr(op.op, "__name__", "") == "isend":
                rec.p2p += op.tensor.numel() * op.tensor.element_size()
        return real_batch(p2p_op_list)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        p = dist.get_world_size(group)
        me = dist.get_rank(group)
        rows = input.shape[0]
        row_bytes = math.prod(input.shape[1:]) * input.element_size()
        kept = input_split_sizes[me] if input_split_sizes is not None else rows // p
        rec.a2a += (rows - kept) * row_bytes
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.batch_isend_irecv, dist.all_to_all_single = batch_isend_irecv, all_to_all_single
    try:
        yield rec
    finally:
        dist.batch_isend_irecv, dist.all_to_all_single = real_batch, real_a2a


def _inputs(case: ByteCase, dtype: torch.dtype):
    g = torch.Generator().manual_seed(sum(case.seqlens) + case.heads)
    t = sum(case.seqlens)
    q = torch.randn(t, case.heads, case.head_dim, generator=g).to(dtype)
    k = torch.randn(t, case.kv_heads, case.head_dim, generator=g).to(dtype)
    v = torch.randn(t, case.kv_heads, case.head_dim, generator=g).to(dtype)
    dout = torch.randn(t, case.heads, case.head_dim, generator=g).to(dtype)
    return q, k, v, dout


def run_byte_case(case: ByteCase, transport: bool = False) -> dict:
    """Forward, then backward, of one case on this rank; the counters' bytes of each phase."""
    from seqpar.attention.hybrid import hybrid_attn_varlen_func
    from seqpar.attention.layout import build_layout
    from seqpar.attention.ring import ring_attn_varlen_func
    from seqpar.attention.ulysses import ulysses_attn_varlen_func
    from seqpar.parallel.comm import COUNTERS

    world = dist.get_world_size()
    u, r = case.degrees(world)
    groups = sp_groups(u, r)
    dtype = getattr(torch, case.dtype)
    cu = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int32)
    layout = build_layout(cu.numpy(), case.layout, ulysses=u, ring=r)
    sp_rank = dist.get_rank(groups.sp)
    q, k, v, dout = (layout.shard(x, sp_rank) for x in _inputs(case, dtype))
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    kwargs = dict(layout=layout, causal=case.causal, return_lse=case.return_lse)
    rec = _Transport()
    result: dict = {"sp_rank": sp_rank, "tokens": int(q.shape[0])}
    with _wrap_transport(rec) if transport else nullcontext():
        dist.barrier()
        COUNTERS.reset()
        if case.algo == "ring":
            out = ring_attn_varlen_func(q, k, v, cu, group=groups.sp, **kwargs)
        elif case.algo == "ulysses":
            out = ulysses_attn_varlen_func(q, k, v, cu, group=groups.sp, **kwargs)
        else:
            out = hybrid_attn_varlen_func(q, k, v, cu, ulysses_group=groups.ulysses, ring_group=groups.ring, **kwargs)
        if case.return_lse:
            out, lse = out
            assert lse.shape == (case.heads, q.shape[0]) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
        result["fwd"] = COUNTERS.snapshot()
        result["fwd_transport"] = {"p2p": rec.p2p, "a2a": rec.a2a}
        assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
        COUNTERS.reset()
        rec.reset()
        out.backward(dout)
        result["bwd"] = COUNTERS.snapshot()
        result["bwd_transport"] = {"p2p": rec.p2p, "a2a": rec.a2a}
        COUNTERS.reset()
        dist.barrier()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    return result


def run_byte_cases(cases: list[ByteCase], transport: bool = False) -> list[dict]:
    """Every case on this rank; a case that raises returns {"error": traceback} and the rest still run."""
    out = []
    for case in cases:
        try:
            out.append(run_byte_case(case, transport))
        except Exception:  # noqa: BLE001 - reported per case by the test
            out.append({"error": traceback.format_exc()})
    return out
