"""Block attention for CPU blocks that are runs of documents (ring steps under zigzag sharding),
with torch's fused CPU flash op per tile instead of the unfused reference.

A ring step attends this rank's queries to another rank's keys. Under the zigzag layout each
holds every long document as chunks (runs of consecutive positions) and short documents whole,
so a (query run, key run) pair of one document is always one of three tiles:
- *full*: every key precedes every query (the key chunk lies before the query chunk);
- *diagonal*: the same positions on both sides (causal attention inside the chunk);
- *none*: every key follows every query (nothing visible).
Without causal masking every pair of one document is full. Each visible tile runs
``_scaled_dot_product_flash_attention_for_cpu`` (tiled, fused, with its backward op), and a run's
tiles merge by their log-sum-exp, exactly as ring steps merge. Anything else (a partial tile, or
blocks of so many tiny runs that per-tile calls would cost more than the reference's batched
matmuls) goes to the reference, so results never depend on the layout, only the speed does.

The backward takes the FINAL (merged) out and lse of the queries, like every block backward of
the contract (``kernels/reference.py``): the op's own row term rowsum(dout * out) and
p = exp(s - lse) are then the global ones, so per-tile gradients add up exactly.
Run detection reads q_doc / q_pos on the host: free on CPU, where this path is chosen.
"""

from __future__ import annotations

import numpy as np
import torch

from seqpar.kernels import reference
from seqpar.kernels.cpu_flash import _expand_kv, _fold_kv

#: More tiles than this in one block and the reference's few batched matmuls win over per-tile calls.
MAX_TILES = 256
_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

Run = tuple[int, int, int, int]  # (doc, first row, rows, first position)
Tile = tuple[int, int, int, int, bool]  # (q row, q rows, k row, k rows, causal diagonal)


def runs(doc: torch.Tensor, pos: torch.Tensor) -> list[Run]:
    """Maximal row ranges of one document with consecutive positions (host arrays on CPU)."""
    d, p = doc.numpy().astype(np.int64), pos.numpy().astype(np.int64)
    if d.size == 0:
        return []
    brk = np.flatnonzero((d[1:] != d[:-1]) | (p[1:] != p[:-1] + 1)) + 1
    starts = np.concatenate([[0], brk])
    stops = np.concatenate([brk, [d.size]])
    return [(int(d[s]), int(s), int(e - s), int(p[s])) for s, e in zip(starts, stops)]


def tiles(q_runs: list[Run], k_runs: list[Run], causal: bool) -> list[Tile] | None:
    """Visible (q row, q rows, k row, k rows, causal) tiles, or None when a partial tile needs the reference."""
    by_doc: dict[int, list[Run]] = {}
    for r in k_runs:
        by_doc.setdefault(r[0], []).append(r)
    out = []
    for doc, qs, qn, qp in q_runs:
        for _, ks, kn, kp in by_doc.get(doc, ()):
            if not causal or kp + kn - 1 <= qp:  # every key at or before every query
                out.append((qs, qn, ks, kn, False))
            elif kp > qp + qn - 1:  # every key after every query
                continue
            elif kp == qp and kn == qn:
                out.append((qs, qn, ks, kn, True))
            else:
                return None
            if len(out) > MAX_TILES:
                return None
    return out


def _heads(x: torch.Tensor) -> torch.Tensor:
    """[n, H, D] rows -> [1, H, n, D] (a view)."""
    return x.unsqueeze(0).transpose(1, 2)


def block_attn_fwd(q, k, v, q_doc, q_pos, k_doc, k_pos, *, causal: bool, scale: float):
    """The contract's forward (``reference.block_attn_fwd``) with fused tiles where the block allows."""
    plan = tiles(runs(q_doc, q_pos), runs(k_doc, k_pos), causal) if q.device.type == "cpu" else None
    if plan is None:
        return reference.block_attn_fwd(q, k, v, q_doc, q_pos, k_doc, k_pos, causal=causal, scale=scale)
    reference.validate_args("block_attn_fwd", q, k, v, q_doc, q_pos, k_doc, k_pos)
    heads = q.shape[1]
    cd = reference.compute_dtype(q, k, v)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    out = torch.zeros(q.shape, dtype=cd)
    lse = torch.full((heads, q.shape[0]), float("-inf"), dtype=cd)
    for qs, qn, ks, kn, diag in plan:
        o, l = _fwd(_heads(qc[qs:qs + qn]), _expand_kv(_heads(kc[ks:ks + kn]), heads),
                    _expand_kv(_heads(vc[ks:ks + kn]), heads), 0.0, diag, scale=scale)
        o, l = o[0].transpose(0, 1), l[0].to(cd)  # [qn, H, D], [H, qn]
        rows = slice(qs, qs + qn)
        out[rows], lse[:, rows] = reference.merge(out[rows], lse[:, rows], o, l)
    return out, lse


def block_attn_bwd(dout, q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos, *, causal: bool, scale: float,
                   delta: torch.Tensor | None = None):
    """The contract's backward (``reference.block_attn_bwd``): out and lse are the queries' final values."""
    plan = tiles(runs(q_doc, q_pos), runs(k_doc, k_pos), causal) if q.device.type == "cpu" else None
    if plan is None:
        return reference.block_attn_bwd(dout, q, k, v, out, lse, q_doc, q_pos, k_doc, k_pos, causal=causal,
                                        scale=scale, delta=delta)
    heads, kv_heads = q.shape[1], k.shape[1]
    cd = reference.compute_dtype(q, k, v)
    qc, kc, vc, oc, gc = (x.to(cd) for x in (q, k, v, out, dout))
    lc = lse.to(cd)
    dq = torch.zeros(q.shape, dtype=cd)
    dk = torch.zeros(k.shape, dtype=cd)
    dv = torch.zeros(k.shape, dtype=cd)
    for qs, qn, ks, kn, diag in plan:
        rows = slice(qs, qs + qn)
        gq, gk, gv = _bwd(_heads(gc[rows]), _heads(qc[rows]), _expand_kv(_heads(kc[ks:ks + kn]), heads),
                          _expand_kv(_heads(vc[ks:ks + kn]), heads), _heads(oc[rows]), lc[:, rows].unsqueeze(0),
                          0.0, diag, scale=scale)
        dq[rows] += gq[0].transpose(0, 1)
        dk[ks:ks + kn] += _fold_kv(gk, kv_heads)[0].transpose(0, 1)
        dv[ks:ks + kn] += _fold_kv(gv, kv_heads)[0].transpose(0, 1)
    return dq, dk, dv
