"""Communication for sequence parallelism, with bytes counted at every send call.

- :class:`RingExchange`: send to the next rank / receive from the previous one in a group, as
  ``start()`` then ``wait()`` so the overlap with compute is visible at the call site.
- :func:`all_to_all_tokens`: the Ulysses exchange with per-rank (possibly uneven, possibly zero)
  token counts, as an autograd function whose backward is the reverse exchange.
- :data:`COUNTERS`: bytes handed to the transport per op name, per process. Counting is by the
  tensors passed to send calls (not by what the transport reports), so tests and benchmarks can
  check them against closed-form formulas.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist


class CommCounters:
    """Bytes sent by this process, per op name (e.g. "ring_fwd_kv", "ulysses_a2a")."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, op: str, nbytes: int) -> None:
        self.bytes[op] += int(nbytes)
        self.calls[op] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, int]:
        return dict(self.bytes)

    def total(self) -> int:
        return sum(self.bytes.values())


# Per-process accounting only (no process-group state): reset and read it around a step.
COUNTERS = CommCounters()


class ExchangeTrace:
    """Order of ring events on this process: ("post" | "wait" | "compute", name, step).

    Off by default (one attribute test per event); tests switch it on around a call to assert
    that transfers are posted before the compute they overlap and waited for only after it.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.events: list[tuple[str, str, int]] = []

    def record(self, kind: str, name: str, step: int) -> None:
        if self.enabled:
            self.events.append((kind, name, step))

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[str, str, int]]]:
        self.events = []
        self.enabled = True
        try:
            yield self.events
        finally:
            self.enabled = False


TRACE = ExchangeTrace()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class RingExchange:
    """One hop around ``group``: send tensors to rank+1, receive same-shaped ones from rank-1.

    recv_shapes: shapes (and dtype) of what the previous rank sends, which every rank knows from
    the layout, so no sizes travel. Empty tensors are not transferred at all.
    """

    def __init__(self, group: dist.ProcessGroup, op_name: str) -> None:
        self.group = group
        self.op_name = op_name
        self.size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (rank - 1) % self.size)
        self._reqs: list = []
        self._recv: list[torch.Tensor] = []

    def start(self, send: Sequence[torch.Tensor], recv_shapes: Sequence[tuple[torch.Size, torch.dtype]], step: int = -1) -> None:
        """Post the transfers (non-blocking); ``step`` labels the event in :data:`TRACE`."""
        TRACE.record("post", self.op_name, step)
        device = send[0].device if send else torch.device("cpu")
        ops = []
        for t in send:
            if t.numel():
                t = t.contiguous()
                ops.append(dist.P2POp(dist.isend, t, self.next, self.group))
                COUNTERS.add(self.op_name, _nbytes(t))
        self._recv = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in recv_shapes]
        for t in self._recv:
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, t, self.prev, self.group))
        self._reqs = dist.batch_isend_irecv(ops) if ops else []

    def wait(self, step: int = -1) -> list[torch.Tensor]:
        """Block until the hop is done; returns the received tensors."""
        TRACE.record("wait", self.op_name, step)
        for req in self._reqs:
            req.wait()
        self._reqs = []
        out, self._recv = self._recv, []
        return out


def _all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group, op_name: str) -> torch.Tensor:
    """all_to_all_single along dim 0 with explicit counts (rows per rank)."""
    x = x.contiguous()
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    row = math.prod(x.shape[1:]) * x.element_size()
    me = dist.get_rank(group)
    # Rows kept on this rank never touch the transport: count only what goes to others.
    COUNTERS.add(op_name, row * (sum(send_counts) - send_counts[me]))
    dist.all_to_all_single(out, x, recv_counts, send_counts, group=group)
    return out


def _seq_to_head(x: torch.Tensor, counts: list[int], group, op_name: str) -> torch.Tensor:
    """[T_me, P * h, D] -> [sum(counts), h, D]: my tokens' head slice j goes to rank j."""
    p = dist.get_world_size(group)
    t, heads, d = x.shape
    h = heads // p
    # Pack by destination rank: [P, T_me, h, D] so rank j's slice is contiguous.
    if counts[dist.get_rank(group)] != t:
        raise ValueError(f"seq_to_head: this rank holds {t} tokens but counts say {counts[dist.get_rank(group)]}")
    send = x.reshape(t, p, h, d).transpose(0, 1).reshape(p * t, h, d)
    return _all_to_all(send, [t] * p, list(counts), group, op_name)


def _head_to_seq(x: torch.Tensor, counts: list[int], group, op_name: str) -> torch.Tensor:
    """[sum(counts), h, D] -> [T_me, P * h, D]: rows of rank i go back to rank i."""
    p = dist.get_world_size(group)
    me = dist.get_rank(group)
    _, h, d = x.shape
    t = counts[me]
    recv = _all_to_all(x, list(counts), [t] * p, group, op_name)
    return recv.reshape(p, t, h, d).transpose(0, 1).reshape(t, p * h, d)


class _Exchange(torch.autograd.Function):
    """The Ulysses exchange in either direction; its backward is the other direction."""

    @staticmethod
    def forward(ctx, x, counts, group, op_name, to_heads):
        ctx.counts, ctx.group, ctx.op_name, ctx.to_heads = counts, group, op_name, to_heads
        return (_seq_to_head if to_heads else _head_to_seq)(x, counts, group, op_name)

    @staticmethod
    def backward(ctx, grad):
        reverse = _head_to_seq if ctx.to_heads else _seq_to_head
        return reverse(grad, ctx.counts, ctx.group, ctx.op_name), None, None, None, None


def seq_to_head(x: torch.Tensor, counts: Sequence[int], group: dist.ProcessGroup, op_name: str = "ulysses_a2a") -> torch.Tensor:
    """Scatter heads, gather tokens (collective over ``group``).

    x: [T_me, heads, D] with heads divisible by the group size P; counts[i]: tokens of rank i
    (T_me == counts[rank]). Returns [sum(counts), heads / P, D]: every rank's tokens in rank
    order, for this rank's head slice [rank * heads / P, (rank + 1) * heads / P).
    """
    return _Exchange.apply(x, list(counts), group, op_name, True)


def head_to_seq(x: torch.Tensor, counts: Sequence[int], group: dist.ProcessGroup, op_name: str = "ulysses_a2a") -> torch.Tensor:
    """Inverse of :func:`seq_to_head`: [sum(counts), h, D] -> [counts[rank], P * h, D]."""
    return _Exchange.apply(x, list(counts), group, op_name, False)


def _pack_heads(xs: Sequence[torch.Tensor], p: int) -> torch.Tensor:
    """[T, P * h_i, D] each -> [P * T, sum(h_i), D]: rank j's head slices of every tensor, adjacent."""
    t, d = xs[0].shape[0], xs[0].shape[2]
    widths = [x.shape[1] // p for x in xs]
    send = xs[0].new_empty((p, t, sum(widths), d))
    off = 0
    for x, w in zip(xs, widths):  # one copy per tensor, straight into the send buffer
        send[:, :, off : off + w] = x.reshape(t, p, w, d).transpose(0, 1)
        off += w
    return send.view(p * t, sum(widths), d)


def _unpack_heads(x: torch.Tensor, widths: Sequence[int], p: int) -> list[torch.Tensor]:
    """Inverse of :func:`_pack_heads`: [P * T, sum(h_i), D] -> [T, P * h_i, D] each."""
    t, d = x.shape[0] // p, x.shape[2]
    x = x.view(p, t, sum(widths), d)
    out, off = [], 0
    for w in widths:
        out.append(x[:, :, off : off + w].transpose(0, 1).reshape(t, p * w, d))
        off += w
    return out


class _PackedSeqToHead(torch.autograd.Function):
    """Several tensors' seq -> head exchange in ONE all-to-all (q, k, v of Ulysses); backward too."""

    @staticmethod
    def forward(ctx, counts, group, op_name, *xs):
        p, me = dist.get_world_size(group), dist.get_rank(group)
        t = xs[0].shape[0]
        if counts[me] != t or any(x.shape[0] != t or x.shape[2] != xs[0].shape[2] for x in xs):
            raise ValueError(f"seq_to_head: this rank holds {t} tokens (counts say {counts[me]}); "
                             "every tensor must be [T_me, heads, D] with one D")
        widths = [x.shape[1] // p for x in xs]
        ctx.counts, ctx.group, ctx.op_name, ctx.widths = counts, group, op_name, widths
        recv = _all_to_all(_pack_heads(xs, p), [t] * p, list(counts), group, op_name)
        out, off = [], 0
        for w in widths:
            out.append(recv[:, off : off + w])
            off += w
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        p, me = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        t = ctx.counts[me]
        ref = next(g for g in grads if g is not None)
        parts = [g if g is not None else ref.new_zeros((ref.shape[0], w, ref.shape[2])) for g, w in zip(grads, ctx.widths)]
        packed = torch.cat(parts, dim=1)
        back = _all_to_all(packed, list(ctx.counts), [t] * p, ctx.group, ctx.op_name)
        return (None, None, None, *_unpack_heads(back, ctx.widths, p))


def seq_to_head_many(
    xs: Sequence[torch.Tensor], counts: Sequence[int], group: dist.ProcessGroup, op_name: str = "ulysses_a2a"
) -> tuple[torch.Tensor, ...]:
    """:func:`seq_to_head` of several tensors in one all-to-all (collective over ``group``).

    xs[i]: [T_me, heads_i, D] (one D, heads_i divisible by P). Returns [sum(counts), heads_i / P, D]
    each (views of one receive buffer). Bytes equal separate exchanges; launches: one forward,
    one backward.
    """
    return _PackedSeqToHead.apply(list(counts), group, op_name, *xs)
