"""Differentiable single-device attention on top of the block contract.

block_attention takes arbitrary doc/pos metadata (any shard of q and k);
varlen_attention is the packed-stream convenience in the spirit of flash-attn's
flash_attn_varlen_func (self-attention, one cu_seqlens for q and k).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from seqpar.kernels.cpu_flash import whole_doc_attention
from seqpar.kernels.dispatch import get_impl, resolve_impl
from seqpar.kernels.reference import compute_dtype
from seqpar.kernels.varlen import doc_ids_and_positions, validate_cu_seqlens

CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


class BlockAttention(torch.autograd.Function):
    """out, lse = attention(q, k, v) with the doc/pos mask rule; impl is a resolved name.

    lse is returned for callers that merge partial results but is not
    differentiable: no gradient flows back through it.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_doc, q_pos, k_doc, k_pos, causal: bool, scale: float, impl: str):
        fwd, bwd = get_impl(impl)
        out, lse = fwd(q, k, v, q_doc, q_pos, k_doc, k_pos, causal=causal, scale=scale)
        # The output is saved once, in the input dtype, as the tensor returned (the next layer
        # saves the same storage); delta = rowsum(dout * out) is taken from it in fp32, as
        # FlashAttention-2 does.
        out = out.to(q.dtype)
        lse = lse.to(compute_dtype(q))
        ctx.save_for_backward(q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos)
        ctx.causal, ctx.scale, ctx.bwd = causal, scale, bwd
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(
            dout, q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos, causal=ctx.causal, scale=ctx.scale
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _no_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with no queries or no keys: out = 0, lse = -inf, and zero gradients that still reach
    q, k and v (an empty pass must give every parameter a gradient: FSDP reduces the same set of
    gradients on every rank)."""
    out = q * 0 + (k.sum() + v.sum()) * 0
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32),
                     device=q.device)
    return out, lse


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "reference",
    return_lse: bool = False,
    whole: np.ndarray | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention of q over k/v with the document/position mask rule.

    q: [Tq, H, D]; k, v: [Tk, Hkv, D]; q_doc, q_pos: [Tq] int; k_doc, k_pos:
    [Tk] int. scale defaults to 1/sqrt(D); impl is a kernels.attention config
    value (auto | triton | sdpa_cpu | reference). whole: host cu_seqlens when q and
    k are the same tokens and they are whole documents in order (positions
    0..L-1); with impl sdpa_cpu such a block runs torch's fused CPU kernel.
    Returns out [Tq, H, D] in q.dtype and, with return_lse, lse [H, Tq] fp32
    (fp64 for fp64 q), not differentiable. Gradients reach q, k, v in their own dtypes.
    """
    scale = _default_scale(q, scale)
    name = resolve_impl(impl, q.device)
    if q.shape[0] == 0 or k.shape[0] == 0:
        out, lse = _no_tokens(q, k, v)
        return (out, lse) if return_lse else out
    if whole is not None and name == "sdpa_cpu" and cpu_flash_applies(q, k, v):
        out, lse = whole_doc_attention(q, k, v, whole, causal=causal, scale=scale)
        return (out, lse) if return_lse else out
    out, lse = BlockAttention.apply(q, k, v, q_doc, q_pos, k_doc, k_pos, causal, scale, name)
    return (out, lse) if return_lse else out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "reference",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Packed self-attention on one device: each document attends only to itself.

    q: [T, H, D]; k, v: [T, Hkv, D]; cu_seqlens: int32 [n_docs + 1] with
    cu_seqlens[-1] = T. Same return convention as block_attention.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0]:
        raise ValueError(
            f"varlen_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, heads, head_dim] with equal T"
        )
    validate_cu_seqlens(cu_seqlens, q.shape[0])
    doc, pos = doc_ids_and_positions(cu_seqlens.to(q.device))
    whole = cu_seqlens.numpy().astype(np.int64) if cu_seqlens.device.type == "cpu" else None
    return block_attention(
        q, k, v, doc, pos, doc, pos, causal=causal, scale=scale, impl=impl, return_lse=return_lse, whole=whole
    )


def cpu_flash_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """torch's CPU flash kernel takes these tensors: CPU, one dtype of fp32/bf16/fp64, same tokens."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and q.dtype in CPU_FLASH_DTYPES
            and k.shape[0] == q.shape[0])
