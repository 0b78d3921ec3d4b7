"""Fused in-place merge of partial attention results (ring attention's per-step combine).

The reference merge (kernels/reference.py, the oracle) runs about ten elementwise passes over
fp32 [T, H, D] with fresh allocations per ring step. Here one kernel reads the running
(out, lse) and the block's (out_b, lse_b) once and writes the merged result into the running
tensors: per (token tile, head), lse = max + log(1 + exp(-|la - lb|)) and the weights are
sigmoids of the lse difference (exact at large |lse|, as in the reference); a side at -inf
contributes nothing, both at -inf give out = 0, lse = -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per program; the head dimension is one power-of-two tile.
BLOCK_T = 32


@triton.jit
def _merge_kernel(
    out, lse, out_b, lse_b,
    s_ot, s_oh, s_bt, s_bh, s_lh, s_bl,
    T, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    la = tl.load(lse + h * s_lh + t, mask=t_ok, other=float("-inf"))
    lb = tl.load(lse_b + h * s_bl + t, mask=t_ok, other=float("-inf"))
    mx = tl.maximum(la, lb)
    empty = mx == float("-inf")
    # Both -inf would give NaN in la - lb: take the difference of zeros there instead.
    diff = tl.where(empty, 0.0, la) - tl.where(empty, 0.0, lb)
    wa = tl.where(empty, 0.0, 1.0 / (1.0 + tl.exp(-diff)))
    wb = tl.where(empty, 0.0, 1.0 / (1.0 + tl.exp(diff)))
    # Both finite: mx + log(1 + exp(-|diff|)); one side -inf: exp(-inf) = 0 leaves mx.
    new_lse = tl.where(empty, float("-inf"), mx + tl.log(1.0 + tl.exp(-tl.abs(diff))))
    tl.store(lse + h * s_lh + t, new_lse, mask=t_ok)
    m2 = t_ok[:, None] & (d[None, :] < HEAD_DIM)
    pa = out + t[:, None] * s_ot + h * s_oh + d[None, :]
    pb = out_b + t[:, None] * s_bt + h * s_bh + d[None, :]
    oa = tl.load(pa, mask=m2, other=0.0)
    ob = tl.load(pb, mask=m2, other=0.0)
    tl.store(pa, wa[:, None] * oa + wb[:, None] * ob, mask=m2)


def merge_(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (out_b, lse_b) into the running (out, lse) in place; returns (out, lse).

    out, out_b: fp32 [T, H, D] with unit stride on D; lse, lse_b: fp32 [H, T] with unit stride
    on T. out and lse must be owned by the caller (they are overwritten). Same result as
    reference.merge up to fp32 rounding.
    """
    t, heads, dim = out.shape
    if out_b.shape != out.shape or lse.shape != (heads, t) or lse_b.shape != (heads, t):
        raise ValueError(f"merge_: out {tuple(out.shape)}, out_b {tuple(out_b.shape)}, lse {tuple(lse.shape)} and "
                         f"lse_b {tuple(lse_b.shape)} must be [T, H, D] twice and [H, T] twice")
    for name, x in (("out", out), ("lse", lse), ("out_b", out_b), ("lse_b", lse_b)):
        if x.dtype != torch.float32 or x.stride(-1) != 1:
            raise ValueError(f"merge_: {name} must be fp32 with a unit last stride, got {x.dtype} strides {x.stride()}")
    if t == 0:
        return out, lse
    grid = (triton.cdiv(t, BLOCK_T), heads)
    _merge_kernel[grid](
        out, lse, out_b, lse_b,
        out.stride(0), out.stride(1), out_b.stride(0), out_b.stride(1), lse.stride(0), lse_b.stride(0),
        t, HEAD_DIM=dim, BLOCK_T=BLOCK_T, BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )
    return out, lse
