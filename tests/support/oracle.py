"""Shared fp64 attention oracle for kernel and distributed tests.

Written independently of seqpar (no seqpar imports, no torch SDPA): the plain
softmax(Q K^T) V definition with K/V heads repeated explicitly, so a bug in the
reference kernel cannot hide in the oracle as well.

Mask rule: query i sees key j iff q_doc[i] == k_doc[j] and
(not causal or k_pos[j] <= q_pos[i]).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [Tq, H, D]; k, v: [Tk, Hkv, D] -> out [Tq, H, D] fp64, lse [H, Tq] fp64.

    Query head h uses kv head h // (H // Hkv). Rows with no visible key give
    out = 0, lse = -inf. Differentiable w.r.t. q, k, v without NaN.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    if k.shape[0] == 0:  # no keys at all: every row is empty (amax would reject the empty axis)
        out = q.to(torch.float64) * 0.0
        return out, torch.full((heads, q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)  # [Tk, H, D]
    v64 = v.to(torch.float64).repeat_interleave(group, dim=1)

    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale  # [H, Tq, Tk]
    visible = q_doc[:, None] == k_doc[None, :]
    if causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    scores = scores.masked_fill(~visible, float("-inf"))

    # Softmax is shift invariant, so a detached shift keeps gradients exact;
    # shifting empty rows by 0 keeps exp(-inf) = 0 and their gradients at 0.
    shift = scores.amax(dim=-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(scores - shift)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("hqk,khd->qhd", probs, v64)
    lse = (shift + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return out, lse


def oracle_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqlens: Sequence[int],
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed self-attention, one document at a time (memory ~ max doc length^2).

    q: [T, H, D]; k, v: [T, Hkv, D]; seqlens: document lengths summing to T.
    Returns out [T, H, D] fp64 and lse [H, T] fp64.
    """
    assert sum(seqlens) == q.shape[0] == k.shape[0], (seqlens, q.shape, k.shape)
    outs, lses = [], []
    start = 0
    for length in seqlens:
        sl = slice(start, start + length)
        pos = torch.arange(length, device=q.device)
        doc = torch.zeros(length, dtype=torch.long, device=q.device)
        o, l = oracle_attention(q[sl], k[sl], v[sl], doc, pos, doc, pos, causal, scale)
        outs.append(o)
        lses.append(l)
        start += length
    if not outs:
        return oracle_attention(q, k, v, *(torch.zeros(0, dtype=torch.long),) * 4, causal, scale)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def oracle_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    *args,
    attn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = oracle_attention,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run attn (oracle_attention or oracle_varlen) under fp64 autograd.

    *args/**kwargs follow q, k, v in attn's signature. Returns
    (out, lse, dq, dk, dv), all fp64, where d* = d(sum(out * dout))/d*.
    """
    leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v)]
    with torch.enable_grad():
        out, lse = attn(*leaves, *args, **kwargs)
        dq, dk, dv = torch.autograd.grad(
            out, leaves, dout.to(torch.float64), allow_unused=True, materialize_grads=True
        )
    return out.detach(), lse.detach(), dq, dk, dv


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in fp64; equal infinities count as 0, NaN as inf."""
    if x.numel() == 0:
        return 0.0
    x, ref = x.to(torch.float64), ref.to(torch.float64)
    diff = (x - ref).abs()
    diff = torch.where(torch.isinf(ref) & (x == ref), torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"), posinf=float("inf"))
    return float(diff.max())


def assert_close_to_oracle(
    actual: torch.Tensor,
    ref_fp64: torch.Tensor,
    same_dtype_single: torch.Tensor,
    factor: float = 2.0,
    atol: float = 1e-6,
    *,
    name: str = "tensor",
) -> None:
    """MagiAttention-style precision rule.

    max|actual - ref| <= factor * max|same_dtype_single - ref| + atol, where
    ref_fp64 is the fp64 truth and same_dtype_single is the single-device
    result computed in the same working dtype as actual.
    """
    assert actual.shape == ref_fp64.shape == same_dtype_single.shape, (
        f"{name}: shapes differ: actual {tuple(actual.shape)}, ref {tuple(ref_fp64.shape)}, "
        f"single {tuple(same_dtype_single.shape)}"
    )
    err = _max_err(actual, ref_fp64)
    base = _max_err(same_dtype_single, ref_fp64)
    bound = factor * base + atol
    assert err <= bound, (
        f"{name}: max|actual - fp64 ref| = {err:.3e} exceeds {factor} x max|single - fp64 ref| "
        f"({base:.3e}) + {atol:.1e} = {bound:.3e}"
    )
