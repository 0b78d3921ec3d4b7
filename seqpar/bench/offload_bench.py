"""``seqpar bench offload``: what offloading costs in step time, against ``selective`` in the same run,
and whether the transfer engine changes any gradient.

    seqpar bench offload --model 2048,8,16,4 --vocab 32000 --tokens 32768,65536,131072   # one GPU
    seqpar bench offload --model 64,4,4,2 --vocab 512 --tokens 512 --steps 1             # CPU smoke

One process, one micro-batch of one document per length, AdamW, each policy on a fresh model of the
same seed: a warm-up step, then ``steps`` timed steps (median). CUDA: the CUDA engine (pinned slabs
sized by the estimator for the length, D2H/H2D streams), bf16 autocast, the Triton kernel, peaks
from ``max_memory_allocated``. CPU: the host engine (synchronous copies: its overhead is the copies
themselves, not a measure of overlap), fp32, the reference kernel. Gradients of the first step of
every policy are compared with ``selective``'s (the same math; memo splits the token-local matmuls
in two row blocks, offload only moves bytes). Prints step time and its ratio to selective, peak
device memory, bytes offloaded per step and the gradient error; writes JSON with ``--json``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from seqpar.config import MEMORY_POLICIES, ModelConfig


@dataclass(frozen=True)
class OffloadRow:
    tokens: int
    policy: str
    step_s: float  # median of the timed steps
    peak_bytes: int  # CUDA: max_memory_allocated over the timed steps; CPU: 0 (not measured here)
    offloaded_bytes: int  # moved to host memory per step
    grad_error: float  # max |g - g_selective| / max |g_selective| over parameters, after the first step


def _engine(cfg: ModelConfig, policy: str, tokens: int, alpha: float, device: torch.device, keep_last: int):
    from seqpar.bench.memory_bench import layout_for
    from seqpar.memory.transfer import HostEngine

    if device.type != "cuda":
        return HostEngine(1)
    from seqpar.memory.cuda_engine import CudaEngine
    from seqpar.train.memory_setup import slab_bytes

    lay = dataclasses.replace(layout_for(device, 4096), alpha=alpha, keep_last=keep_last)
    return CudaEngine(device, max(0, cfg.n_layers - keep_last), slab_bytes(cfg, policy, lay, tokens))


def _run(cfg: ModelConfig, policy: str, tokens: int, steps: int, alpha: float, device: torch.device,
         keep_last: int) -> tuple[list[float], int, int, dict[str, torch.Tensor]]:
    """(timed step seconds, peak bytes, offloaded bytes per step, first-step gradients)."""
    from seqpar.attention import build_attention
    from seqpar.bench.memory_bench import microbatch
    from seqpar.memory.checkpoint import apply_memory_policy
    from seqpar.model.llama import Transformer

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:
        model = Transformer(cfg, build_attention("triton" if cuda else "reference", device))
    model.loss_chunk_tokens = 4096
    engine = _engine(cfg, policy, tokens, alpha, device, keep_last) if policy in ("offload", "memo") else None
    apply_memory_policy(model.layers, policy, engine=engine, keep_last=keep_last, alpha=alpha)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mb = microbatch(tokens, cfg.vocab_size, device, single=True)
    grads: dict[str, torch.Tensor] = {}
    times = []
    moved = 0
    for i in range(steps + 1):
        before = engine.stats.offloaded_bytes if engine is not None else 0
        if cuda:
            torch.cuda.synchronize()
            if i == 1:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(mb.tokens, mb.ctx, labels=mb.labels) / mb.num_targets
        loss.backward()
        if i == 0:
            grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()  # a benchmark: the step's end is measured, not in the training loop
        if i > 0:
            times.append(time.perf_counter() - t0)
        moved = (engine.stats.offloaded_bytes - before) if engine is not None else 0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return times, peak, moved, grads


def _grad_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in ref.items())


def run_offload_bench(cfg: ModelConfig, tokens: list[int], policies: list[str], device: torch.device,
                      steps: int = 3, alpha: float = 0.5, keep_last: int = 2) -> list[OffloadRow]:
    """Rows for every (tokens, policy); ``selective`` always runs first as the baseline."""
    for p in policies:
        if p not in MEMORY_POLICIES:
            raise ValueError(f"--policies: {p!r} is not one of {', '.join(MEMORY_POLICIES)}")
    order = ["selective", *[p for p in policies if p != "selective"]]
    rows = []
    for t in tokens:
        ref: dict[str, torch.Tensor] = {}
        for p in order:
            times, peak, moved, grads = _run(cfg, p, t, steps, alpha, device, keep_last)
            if p == "selective":
                ref = grads
            rows.append(OffloadRow(t, p, statistics.median(times), peak, moved, _grad_error(grads, ref)))
            del grads
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_table(rows: list[OffloadRow], device: torch.device, alpha: float) -> str:
    engine = "CUDA engine (pinned slabs, D2H/H2D streams)" if device.type == "cuda" else "host engine (synchronous copies)"
    lines = [f"seqpar bench offload on {device.type}: {engine}; memo alpha {alpha:g}; step time vs selective in the same run",
             f"{'tokens':>8}  {'policy':<10} {'step s':>8} {'x selective':>11} {'peak':>11} {'offloaded':>11} {'grad err':>9}"]
    base = {r.tokens: r.step_s for r in rows if r.policy == "selective"}
    for r in rows:
        peak = f"{r.peak_bytes / 2**30:.2f} GiB" if r.peak_bytes else "-"
        lines.append(f"{r.tokens:>8,}  {r.policy:<10} {r.step_s:>8.3f} {r.step_s / base[r.tokens]:>11.3f} {peak:>11} "
                     f"{_size(r.offloaded_bytes):>11} {r.grad_error:>9.1e}")
    return "\n".join(lines)
