"""What every attention implementation receives besides q, k, v: the batch's token metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class AttnContext:
    """Token metadata of the local shard, shared by all layers of one forward.

    positions: [T_local] int32, position of each token inside its document (global stream);
    doc_ids: [T_local] int32, document index of each token in the global stream;
    cu_seqlens: [docs + 1] int32, the global stream's documents (identical on every SP rank);
    stream: under SP, the layout and the document ids / positions of every rank's shard.
    """

    positions: torch.Tensor
    doc_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    stream: Any = None  # seqpar.attention.meta.StreamMeta under sequence parallelism: every rank's metadata


class AttentionFn(Protocol):
    """q: [T_local, heads, head_dim]; k, v: [T_local, kv_heads, head_dim] -> out like q."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor: ...
