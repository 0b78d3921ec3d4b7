"""Helpers for packed (variable-length) streams in flash-attn's cu_seqlens convention.

cu_seqlens: int32 [n_docs + 1], cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] = T.
Document i occupies tokens cu_seqlens[i] : cu_seqlens[i + 1].
"""

from __future__ import annotations

import torch


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int | None = None) -> None:
    """Raise ValueError unless cu_seqlens is a valid 1-D integer prefix sum starting at 0.

    total_tokens, when given, must equal cu_seqlens[-1].
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor (int32 by convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"cu_seqlens must be 1-D with n_docs + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    first = int(cu_seqlens[0])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if lengths.numel() and bool((lengths < 0).any()):
        bad = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, but cu_seqlens[{bad + 1}]={int(cu_seqlens[bad + 1])} "
            f"< cu_seqlens[{bad}]={int(cu_seqlens[bad])}"
        )
    last = int(cu_seqlens[-1])
    if total_tokens is not None and last != total_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens ({total_tokens}), got {last}")


def doc_ids_and_positions(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token document index and position within the document.

    cu_seqlens: int [n + 1]. Returns (doc_ids, positions), both int32 [T] on
    cu_seqlens' device, T = cu_seqlens[-1]. Empty documents get no tokens.
    """
    validate_cu_seqlens(cu_seqlens)
    total = int(cu_seqlens[-1])
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    docs = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    positions = torch.arange(total, device=cu.device) - cu[:-1][docs]
    return docs.to(torch.int32), positions.to(torch.int32)
