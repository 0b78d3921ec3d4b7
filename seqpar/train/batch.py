"""From a packed stream to model inputs: targets, positions and document ids (pure).

All three are computed on the **global** stream before any sequence-parallel sharding, so a
shard carries the same values the single-device run would see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from seqpar.attention.context import AttnContext, SPContext
from seqpar.kernels.varlen import doc_ids_and_positions
from seqpar.parallel.pool import SPGroup

IGNORE = -100


def shift_labels(tokens: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """Next-token targets per document: labels[i] = tokens[i + 1], IGNORE at each document's last token.

    tokens: [T] int; cu_seqlens: [docs + 1] int32 -> [T] int64.
    """
    labels = np.full(tokens.shape[0], IGNORE, dtype=np.int64)
    if tokens.shape[0] > 1:
        labels[:-1] = tokens[1:]
    ends = np.asarray(cu_seqlens[1:], dtype=np.int64) - 1
    labels[ends[ends >= 0]] = IGNORE
    return labels


@dataclass
class MicroBatch:
    """One micro-batch on one rank.

    tokens, labels: [T] int64; ctx: positions and document ids [T] int32 plus the global
    cu_seqlens; num_tokens: tokens on this rank (each token counted on exactly one rank);
    targets: this rank's target count when known on the host (no device read), else None.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    ctx: AttnContext
    targets: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_targets(self) -> int:
        if self.targets is not None:
            return self.targets
        return int((self.labels != IGNORE).sum())

    def pin(self) -> MicroBatch:
        """The same micro-batch in pinned host memory (CUDA only: lets ``to`` copy without blocking)."""
        if not torch.cuda.is_available() or self.tokens.device.type != "cpu":
            return self
        ctx = self.ctx
        return replace(self, tokens=self.tokens.pin_memory(), labels=self.labels.pin_memory(),
                       ctx=replace(ctx, positions=ctx.positions.pin_memory(), doc_ids=ctx.doc_ids.pin_memory(),
                                   cu_seqlens=ctx.cu_seqlens.pin_memory()))

    def to(self, device: torch.device) -> MicroBatch:
        """The micro-batch on ``device`` (non-blocking H2D copies from pinned memory); the SP context,
        built for ``device`` already, is kept."""
        if self.tokens.device == device:
            return self
        mv = lambda t: t.to(device, non_blocking=t.is_pinned())  # noqa: E731
        ctx = self.ctx
        return replace(self, tokens=mv(self.tokens), labels=mv(self.labels),
                       ctx=replace(ctx, positions=mv(ctx.positions), doc_ids=mv(ctx.doc_ids), cu_seqlens=mv(ctx.cu_seqlens)),
                       targets=self.num_targets)


def empty_microbatch(device: torch.device) -> MicroBatch:
    """A micro-batch of no tokens: an empty pass that still takes part in every FSDP collective
    (every parameter gets a zero gradient)."""
    zeros = lambda dtype: torch.zeros(0, dtype=dtype, device=device)  # noqa: E731
    return MicroBatch(tokens=zeros(torch.int64), labels=zeros(torch.int64),
                      ctx=AttnContext(positions=zeros(torch.int32), doc_ids=zeros(torch.int32),
                                      cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device),
                                      host_cu=np.zeros(1, dtype=np.int64)),
                      targets=0)


def make_microbatch(tokens: np.ndarray, cu_seqlens: np.ndarray, device: torch.device) -> MicroBatch:
    """Build the full (unsharded) micro-batch of one stream on ``device``."""
    labels = shift_labels(tokens, cu_seqlens)
    cu = torch.as_tensor(np.asarray(cu_seqlens, dtype=np.int32))
    doc_ids, positions = doc_ids_and_positions(cu)
    return MicroBatch(
        tokens=torch.as_tensor(np.asarray(tokens, dtype=np.int64)).to(device),
        labels=torch.as_tensor(labels).to(device),
        ctx=AttnContext(positions=positions.to(device), doc_ids=doc_ids.to(device), cu_seqlens=cu.to(device),
                        host_cu=np.asarray(cu_seqlens, dtype=np.int64)),
        targets=int((labels != IGNORE).sum()),
    )


@dataclass(frozen=True)
class SPAssignment:
    """How this rank runs a micro-batch: ``algorithm`` over pool ``group`` with ``layout``.

    algorithm: ring | ulysses | hybrid (ignored for a degree-1 group, which runs local
    attention on the whole stream); layout: zigzag | contiguous (the ring dimension's, for
    hybrid); group: this rank's view of a ``seqpar.parallel.pool`` group. Static SP uses one
    assignment for every micro-batch; an adaptive plan gives one per micro-batch.
    """

    algorithm: str
    layout: str
    group: SPGroup


def shard_microbatch(mb: MicroBatch, sp: SPAssignment, device: torch.device | None = None) -> MicroBatch:
    """This rank's shard of a global micro-batch: tokens, labels, positions and document ids
    together, plus the SP context attention reads (every rank's metadata is derived from
    cu_seqlens, not sent). A degree-1 group keeps the whole micro-batch (no SP context), and so
    does an empty one (an empty pass: every rank of the group skips the group's collectives).
    device: where attention will run (default: the micro-batch's; the data thread shards on the host)."""
    from seqpar.attention.layout import build_layout
    from seqpar.attention.meta import StreamMeta

    g = sp.group
    if g.degree == 1 or mb.num_tokens == 0:
        return mb
    cu = mb.ctx.cu_seqlens
    host = mb.ctx.host_cu if mb.ctx.host_cu is not None else cu.cpu().numpy().astype(np.int64)
    lay = build_layout(host, sp.layout, ulysses=g.ulysses_degree, ring=g.ring_degree)
    stream = StreamMeta(host, lay, mb.tokens.device if device is None else device)
    labels = lay.shard(mb.labels, g.rank)
    return MicroBatch(
        tokens=lay.shard(mb.tokens, g.rank),
        labels=labels,
        targets=int((labels != IGNORE).sum()) if labels.device.type == "cpu" else None,
        ctx=AttnContext(
            positions=lay.shard(mb.ctx.positions, g.rank),
            doc_ids=lay.shard(mb.ctx.doc_ids, g.rank),
            cu_seqlens=cu,
            sp=SPContext(sp.algorithm, g, stream),
            host_cu=host,
        ),
    )
