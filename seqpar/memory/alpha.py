"""MEMO's offload ratio: the share alpha of each rank's tokens whose token-local tensors are kept
(offloaded) rather than recomputed (``memory.alpha: auto``).

    problem = alpha_problem(model_cfg, layout, tokens=131072, forward_s=2.3, host_bytes_per_s=50e9,
                            host_budget_bytes=240 * 2**30)
    solution = solve_alpha(problem)      # alpha, which bound holds it, transfer time, host bytes

The LP (one variable, so its optimum is a closed form; tests check it against HiGHS):

    maximise alpha in [0, 1]
    s.t. (S_fixed + alpha S_other) / B_host <= T_forward               (one block's offload hides
                                                                        under its forward)
         n_offloaded (S_fixed + alpha S_other) <= host budget per rank  (all offloaded blocks fit)

with S_fixed the block input and attention's tensors (always offloaded), S_other the token-local
ops' tensors at alpha = 1 (``seqpar.memory.estimate.memo_split`` times the tokens). When even
alpha = 0 does not hide, alpha is 0 and the offload is exposed (reported, not an error); when even
alpha = 0 does not fit the host budget, memo cannot run: a one-line error names the key.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from seqpar.config import ModelConfig
from seqpar.memory.estimate import MemoryLayout, memo_split

_GIB = 2**30


@dataclass(frozen=True)
class AlphaProblem:
    """MEMO's LP for one rank: bytes of one block at this rank's tokens, the block's forward time,
    the host link's bandwidth and the host memory the offloaded blocks may use."""

    fixed_bytes: float  # S_input + S_attn: the block input and attention's tensors
    other_bytes: float  # S_other: the token-local ops' saved tensors for all tokens
    forward_s: float  # one block's forward
    host_bytes_per_s: float  # device-to-host copy bandwidth
    host_budget_bytes: float  # host memory for offloaded activations per rank (inf: no bound)
    offloaded_layers: int  # blocks that offload (n_layers - keep_last)


@dataclass(frozen=True)
class AlphaSolution:
    alpha: float
    bound: str  # what holds alpha below 1: none | bandwidth | host memory
    transfer_s: float  # one block's offload at alpha
    host_bytes: float  # every offloaded block at alpha
    hidden: bool  # the offload fits in the block's forward


def solve_alpha(p: AlphaProblem) -> AlphaSolution:
    """The largest alpha in [0, 1] meeting both constraints (see the module doc); ValueError when the
    host budget cannot hold even the always-offloaded part."""
    n = max(p.offloaded_layers, 0)
    if n and p.fixed_bytes * n > p.host_budget_bytes:
        raise ValueError(
            f"memory.host_budget_gib={p.host_budget_bytes / _GIB:.1f}: memo offloads at least "
            f"{p.fixed_bytes * n / _GIB:.1f} GiB per rank (block inputs and attention tensors of {n} blocks); "
            "raise memory.host_budget_gib, raise memory.keep_last, or use memory.policy=selective")
    caps = {"none": 1.0}
    if p.other_bytes > 0:
        caps["bandwidth"] = (p.host_bytes_per_s * p.forward_s - p.fixed_bytes) / p.other_bytes
        if n:
            caps["host memory"] = (p.host_budget_bytes / n - p.fixed_bytes) / p.other_bytes
    bound = min(caps, key=lambda k: (caps[k], k != "none"))
    alpha = min(1.0, max(0.0, caps[bound]))
    moved = p.fixed_bytes + alpha * p.other_bytes
    transfer = moved / p.host_bytes_per_s
    return AlphaSolution(alpha=alpha, bound=bound if alpha < 1.0 else "none", transfer_s=transfer,
                         host_bytes=n * moved, hidden=transfer <= p.forward_s * (1 + 1e-12))


def alpha_problem(m: ModelConfig, lay: MemoryLayout, tokens: int, forward_s: float, host_bytes_per_s: float,
                  host_budget_bytes: float) -> AlphaProblem:
    """The LP for ``tokens`` local tokens per micro-batch in ``lay`` (its keep_last)."""
    fixed, other = memo_split(m, lay)
    return AlphaProblem(fixed * tokens, other * tokens, forward_s, host_bytes_per_s, host_budget_bytes,
                        max(0, m.n_layers - lay.keep_last))


def format_solution(p: AlphaProblem, s: AlphaSolution, source: str) -> str:
    """One line for the start-up log and the dry run."""
    budget = "unbounded" if p.host_budget_bytes == float("inf") else f"{p.host_budget_bytes / _GIB:.1f} GiB"
    return (f"memo alpha {s.alpha:.3f} ({'no bound' if s.bound == 'none' else s.bound + '-bound'}; {source}): "
            f"block forward {p.forward_s * 1e3:.1f} ms, host link {p.host_bytes_per_s / 1e9:.1f} GB/s, "
            f"offload {s.transfer_s * 1e3:.1f} ms per block ({'hidden' if s.hidden else 'EXPOSED'}), "
            f"host {s.host_bytes / _GIB:.1f} GiB of {budget} per rank")


# -- measured inputs (start-up) ---------------------------------------------------------------------


def predicted_forward_s(m: ModelConfig, tokens: int, sequence: int, peak_flops: float, mfu: float = 0.5) -> float:
    """One block's forward at ``tokens`` local tokens of a ``sequence``-token document: matmul FLOPs
    (2 x block parameters per token) and causal attention (2 x q width x tokens x sequence) at
    ``mfu`` of ``peak_flops``. The dry run's stand-in for a measurement."""
    hq, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    block = 2 * m.dim * (hq + kv) + 3 * m.dim * m.ffn_dim
    return (2.0 * block * tokens + 2.0 * hq * tokens * sequence) / (peak_flops * mfu)


def measure_host_bandwidth(device: torch.device, nbytes: int = 64 << 20, reps: int = 3) -> float:
    """Device-to-host bytes per second: into pinned memory on a side stream (CUDA), a memcpy (CPU)."""
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        times = []
        for _ in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()  # start-up only, never in the step
            times.append(start.elapsed_time(end) / 1e3)
        return nbytes / statistics.median(times[1:])
    src, dst = np.ones(nbytes, dtype=np.uint8), np.empty(nbytes, dtype=np.uint8)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:])


def measure_forward_s(block: torch.nn.Module, m: ModelConfig, tokens: int, device: torch.device,
                      dtype: torch.dtype, reps: int = 3) -> float:
    """One block's forward without grad (no policy runs then) on ``tokens`` rows of one local
    document: without SP's attention over the whole sequence, so alpha errs towards recomputing.
    Collective where the block is FSDP-sharded (its all-gather): every rank calls it alike."""
    from seqpar.attention.context import AttnContext
    from seqpar.model.llama import rope_tables

    positions = torch.arange(tokens, dtype=torch.int32, device=device)
    ctx = AttnContext(positions=positions, doc_ids=torch.zeros(tokens, dtype=torch.int32, device=device),
                      cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32, device=device),
                      host_cu=np.array([0, tokens], dtype=np.int64))
    cos, sin = rope_tables(positions, m.head_dim, m.rope_theta, m.llama3_rope)
    x = torch.randn(tokens, m.dim, device=device, dtype=dtype)
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            block(x, cos, sin, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])
