"""Host side of the Triton block attention: the contract's block_attn_fwd / block_attn_bwd.

Same signatures, shapes and results as kernels/reference.py (out and lse in
fp32, gradients in fp32), for fp16, bf16 and fp32 inputs. Runs on CUDA tensors,
or on CPU under ``TRITON_INTERPRET=1`` (slow: ~3 ms per tile iteration, for
tests at small shapes). The interpreter's bf16 arithmetic is wrong, so under
the interpreter bf16 tiles are upcast to fp32 right after loading; the bf16
tensor-core path is therefore only exercised on a GPU.

Block sizes: autotuned on GPU (keyed on head_dim, causal, GQA group and the
length's power of two); fixed by INTERPRET_BLOCKS under the interpreter.
"""

from __future__ import annotations

import torch
import triton

from seqpar.kernels import triton_kernels as tk
from seqpar.kernels.ranges import key_ranges, query_ranges
from seqpar.kernels.reference import block_delta, check_delta, validate_args

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N) under the interpreter. Its cost is per operation, not per
# element, so the tile size mostly sets how many tiles a test case has; tests
# shrink it to 16 to get several tiles of each class from a few dozen tokens.
INTERPRET_BLOCKS = (16, 16)


def interpreting() -> bool:
    """True when these kernels run in Triton's CPU interpreter.

    Triton decides when a kernel is decorated, from TRITON_INTERPRET=1 at
    import time, so ask the kernel object rather than the environment.
    """
    return type(tk._attn_fwd).__name__ == "InterpretedFunction"


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


_KEY = ["HEAD_DIM", "CAUSAL", "GROUP", "len_bucket"]
# Candidates in the range FlashAttention-2's Triton ports use on A100/H100; the
# tuner picks per (head_dim, causal, group, log2 length).
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)])
_DKDV_CONFIGS = _configs([(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2)])
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)])
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY)(tk._attn_fwd)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY)(tk._attn_bwd_dkdv)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY)(tk._attn_bwd_dq)


def _check(fn: str, q, k, v, q_doc, q_pos, k_doc, k_pos) -> tuple[int, int]:
    kv_heads, group = validate_args(fn, q, k, v, q_doc, q_pos, k_doc, k_pos)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(
            f"{fn} (triton): q, k, v must share one dtype of fp16, bf16 or fp32, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "use kernels.attention=reference for other dtypes"
        )
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{fn} (triton): tensors are on {q.device}, the Triton kernel needs CUDA; "
            "use kernels.attention=auto or reference, or set TRITON_INTERPRET=1 to run the (slow) interpreter on CPU"
        )
    return kv_heads, group


def _meta(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int32).contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] with a unit stride on D, which the kernels assume."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _range_args(ranges) -> tuple[torch.Tensor, torch.Tensor]:
    return ranges[0].to(torch.int32), ranges[1].to(torch.int32)


def _common(q: torch.Tensor, group: int, causal: bool) -> dict:
    dim = q.shape[-1]
    return dict(
        GROUP=group,
        HEAD_DIM=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        CAUSAL=bool(causal),
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
    )


def _launch(kernel, tuned, grid_axes: tuple[int, int], blocks: str, args: tuple, kw: dict, len_bucket: int) -> None:
    """Run kernel with fixed interpreter blocks, or its autotuned twin on GPU."""
    n, heads = grid_axes
    if interpreting():
        bm, bn = INTERPRET_BLOCKS
        block = bm if blocks == "M" else bn
        kernel[(triton.cdiv(n, block), heads)](*args, len_bucket, **kw, BLOCK_M=bm, BLOCK_N=bn)
    else:
        tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_" + blocks]), heads)](*args, len_bucket, **kw)


def forward_with_tiles(q, k, v, q_doc, q_pos, k_doc, k_pos, *, causal: bool, scale: float, record: bool = False):
    """block_attn_fwd plus, with record=True (interpreter only), the tile classes the kernel saw.

    Returns (out [Tq, H, D] fp32, lse [H, Tq] fp32, classes int8 [n_q_tiles, n_k_tiles] or None);
    classes uses ranges.NOT_VISITED / EMPTY / FULL / PARTIAL.
    """
    _, group = _check("block_attn_fwd", q, k, v, q_doc, q_pos, k_doc, k_pos)
    tq, heads, dim = q.shape
    tkk = k.shape[0]
    if record and not interpreting():
        raise ValueError("forward_with_tiles(record=True) runs under TRITON_INTERPRET=1 only (it fixes the tile size)")
    bm, bn = INTERPRET_BLOCKS
    classes = torch.full((triton.cdiv(tq, bm), triton.cdiv(tkk, bn)), -1, dtype=torch.int8) if record else None
    if tq == 0 or tkk == 0:
        out = torch.zeros(tq, heads, dim, dtype=torch.float32, device=q.device)
        return out, torch.full((heads, tq), float("-inf"), dtype=torch.float32, device=q.device), classes
    # Every row of out and lse is written by the kernel (rows that see nothing get 0 / -inf there).
    out = torch.empty(tq, heads, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(heads, tq, dtype=torch.float32, device=q.device)
    q, k, v = _rows(q), _rows(k), _rows(v)
    qd, qp, kd, kp = _meta(q_doc), _meta(q_pos), _meta(k_doc), _meta(k_pos)
    lo, hi = _range_args(key_ranges(qd, qp, kd, kp, causal))
    args = (
        q, k, v, out, lse, qd, qp, kd, kp, lo, hi, classes if record else lo,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        tq, tkk, scale * LOG2E, classes.shape[1] if record else 1,
    )
    kw = _common(q, group, causal) | dict(RECORD=record)
    _launch(tk._attn_fwd, _fwd_tuned, (tq, heads), "M", args, kw, tq.bit_length())
    return out, lse, classes


def block_attn_fwd(q, k, v, q_doc, q_pos, k_doc, k_pos, *, causal: bool, scale: float):
    """Triton version of reference.block_attn_fwd: out [Tq, H, D] fp32, lse [H, Tq] fp32."""
    out, lse, _ = forward_with_tiles(q, k, v, q_doc, q_pos, k_doc, k_pos, causal=causal, scale=scale)
    return out, lse


def block_attn_bwd(dout, q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos, *, causal: bool, scale: float,
                   delta: torch.Tensor | None = None):
    """Triton version of reference.block_attn_bwd: dq [Tq, H, D], dk, dv [Tk, Hkv, D], all fp32.

    out and lse are the final (merged) values for these queries; delta =
    rowsum(dout * out) [H, Tq] fp32, computed here unless the caller passes it
    (ring attention computes it once for all key blocks). Deterministic: no atomics.
    """
    kv_heads, group = _check("block_attn_bwd", q, k, v, q_doc, q_pos, k_doc, k_pos)
    tq, heads, dim = q.shape
    tkk = k.shape[0]
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"block_attn_bwd: dout {tuple(dout.shape)} and out {tuple(out.shape)} must match q {tuple(q.shape)}"
        )
    if lse.shape != (heads, tq):
        raise ValueError(f"block_attn_bwd: lse must be [heads, tokens] = {(heads, tq)}, got {tuple(lse.shape)}")
    if tq == 0 or tkk == 0:
        dk = torch.zeros(tkk, kv_heads, dim, dtype=torch.float32, device=q.device)
        return torch.zeros(tq, heads, dim, dtype=torch.float32, device=q.device), dk, torch.zeros_like(dk)
    # Each program stores its whole tile, visited or not, so no memset is needed.
    dq = torch.empty(tq, heads, dim, dtype=torch.float32, device=q.device)
    dk = torch.empty(tkk, kv_heads, dim, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    q, k, v = _rows(q), _rows(k), _rows(v)
    dout = _rows(dout.to(q.dtype))
    delta = block_delta(dout, out) if delta is None else check_delta("block_attn_bwd", delta, heads, tq).float().contiguous()
    lse2 = lse.float()
    # lse = -inf marks a row that sees no key anywhere: +inf makes its p exactly 0.
    lse2 = torch.where(lse2 == float("-inf"), float("inf"), lse2 * LOG2E).contiguous()
    qd, qp, kd, kp = _meta(q_doc), _meta(q_pos), _meta(k_doc), _meta(k_pos)
    common = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
    )
    kw = _common(q, group, causal)
    qlo, qhi = _range_args(query_ranges(qd, qp, kd, kp, causal))
    args = (q, k, v, dout, lse2, delta, dk, dv, qd, qp, kd, kp, qlo, qhi, *common, dk.stride(0), dk.stride(1),
            tq, tkk, scale * LOG2E, scale)
    _launch(tk._attn_bwd_dkdv, _dkdv_tuned, (tkk, kv_heads), "N", args, kw, tq.bit_length())
    klo, khi = _range_args(key_ranges(qd, qp, kd, kp, causal))
    args = (q, k, v, dout, lse2, delta, dq, qd, qp, kd, kp, klo, khi, *common, dq.stride(0), dq.stride(1),
            tq, tkk, scale * LOG2E, scale)
    _launch(tk._attn_bwd_dq, _dq_tuned, (tq, heads), "M", args, kw, tq.bit_length())
    return dq, dk, dv
