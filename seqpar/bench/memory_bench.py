"""``seqpar bench memory``: the memory estimator against measured peaks, per policy and length.

    seqpar bench memory --model 128,4,4,2 --tokens 1024,2048        # CPU: MemTracker, fp32
    seqpar bench memory --model 2048,8,16,4 --tokens 8192,32768      # CUDA: max_memory_allocated, bf16 autocast

One process, one micro-batch of three packed documents, the second training step (AdamW state and
zeroed gradients exist, as in training). CUDA runs the Triton kernel under bf16 autocast; CPU runs
fp32 with the reference kernel and 1 MB score blocks, so activations, not the kernel's workspace,
set the peak. ``offload`` (host engine) is measured on CUDA only: under a CPU allocation tracker
(a TorchDispatchMode: MemTracker, or a storage-counting mode) its offloaded storages still count as
live, although without the mode their bytes are freed, a discrepancy not yet explained; its device
bytes are checked in tests/memory/test_offload.py from the engine's accounting and saved-tensor
hooks instead. Prints measured, estimated and the error for every (tokens, policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seqpar.config import MEMORY_POLICIES, ModelConfig
from seqpar.memory.estimate import MemoryLayout, estimate_memory

#: Score-block bytes of the reference kernel on CPU (its 64 MB default would dominate small runs).
CPU_SCORE_BLOCK_BYTES = 1 << 20
#: offload: the last blocks that keep their saved tensors (memory.keep_last's default).
KEEP_LAST = 2


@dataclass(frozen=True)
class MemoryRow:
    tokens: int
    policy: str
    measured: int
    estimated: float

    @property
    def error(self) -> float:
        return self.estimated / self.measured - 1


def microbatch(tokens: int, vocab: int, device: torch.device):
    """One stream of three packed documents (half, a quarter, the rest) of seeded random tokens."""
    from seqpar.train.batch import make_microbatch

    docs = [tokens // 2, tokens // 4, tokens - tokens // 2 - tokens // 4]
    ids = np.random.default_rng(0).integers(0, vocab, tokens)
    return make_microbatch(ids, np.concatenate([[0], np.cumsum(docs)]).astype(np.int32), device)


def measured_peak(cfg: ModelConfig, policy: str, tokens: int, chunk: int, device: torch.device) -> int:
    """Peak bytes of the forward and backward of a second training step (see the module doc)."""
    from seqpar.attention import build_attention
    from seqpar.memory.checkpoint import apply_memory_policy
    from seqpar.memory.transfer import HostEngine
    from seqpar.model.llama import Transformer

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:
        model = Transformer(cfg, build_attention("triton" if cuda else "reference", device))
    model.loss_chunk_tokens = chunk
    engine = HostEngine(depth=1)
    apply_memory_policy(model.layers, policy, engine=engine, keep_last=KEEP_LAST)
    opt = torch.optim.AdamW(model.parameters())

    def step(mb) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(mb.tokens, mb.ctx, labels=mb.labels)
        loss.backward()

    step(microbatch(64, cfg.vocab_size, device))
    opt.step()
    opt.zero_grad(set_to_none=False)
    mb = microbatch(tokens, cfg.vocab_size, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(mb)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.distributed._tools.mem_tracker import MemTracker

    import seqpar.kernels.reference as reference

    saved, reference.SCORE_BLOCK_BYTES = reference.SCORE_BLOCK_BYTES, CPU_SCORE_BLOCK_BYTES
    try:
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            step(mb)
        return int(tracker.get_tracker_snapshot("peak")[device]["Total"])
    finally:
        reference.SCORE_BLOCK_BYTES = saved


def layout_for(device: torch.device, chunk: int) -> MemoryLayout:
    """The estimator's view of :func:`measured_peak`'s run on ``device``."""
    if device.type == "cuda":
        return MemoryLayout(precision="autocast", attention="flash", loss_chunk_tokens=chunk, keep_last=KEEP_LAST)
    return MemoryLayout(precision="fp32", attention="reference", score_block_bytes=CPU_SCORE_BLOCK_BYTES,
                        loss_chunk_tokens=chunk, keep_last=KEEP_LAST)


def run_memory_bench(cfg: ModelConfig, tokens: list[int], policies: list[str], device: torch.device,
                     chunk: int = 256) -> list[MemoryRow]:
    for p in policies:
        if p not in MEMORY_POLICIES:
            raise ValueError(f"--policies: {p!r} is not one of {', '.join(MEMORY_POLICIES)}")
        if p == "offload" and device.type != "cuda":
            raise ValueError("--policies offload is measured on CUDA only (CPU allocation trackers count its freed "
                             "storages as live); drop it here")
    lay = layout_for(device, chunk)
    return [MemoryRow(t, p, measured_peak(cfg, p, t, chunk, device), estimate_memory(cfg, p, t, lay).peak_bytes)
            for t in tokens for p in policies]


def format_table(rows: list[MemoryRow], device: torch.device) -> str:
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "MemTracker"
    lines = [f"seqpar bench memory on {device.type}: measured ({how}) vs seqpar.memory.estimate",
             f"{'tokens':>8}  {'policy':<10} {'measured':>12} {'estimated':>12} {'error':>8}"]
    for r in rows:
        lines.append(f"{r.tokens:>8,}  {r.policy:<10} {r.measured / 2**20:>8.2f} MiB {r.estimated / 2**20:>8.2f} MiB "
                     f"{100 * r.error:>+7.1f}%")
    worst = max(abs(r.error) for r in rows)
    lines.append(f"largest error {100 * worst:.1f}%")
    return "\n".join(lines)
