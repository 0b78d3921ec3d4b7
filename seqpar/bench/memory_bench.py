"""``seqpar bench memory``: the memory estimator against measured peaks, per policy and length.

    seqpar bench memory --model 128,4,4,2 --tokens 1024,2048        # CPU: MemTracker, fp32
    seqpar bench memory --model 2048,8,16,4 --tokens 8192,32768      # CUDA: max_memory_allocated, bf16 autocast

One process, one micro-batch of three packed documents, the second training step (AdamW state and
zeroed gradients exist, as in training). CUDA runs the Triton kernel under bf16 autocast; CPU runs
fp32 with the reference kernel and 1 MB score blocks, so activations, not the kernel's workspace,
set the peak. ``offload`` and ``memo`` move saved tensors through the host engine (CPU; its pool is
numpy memory, which MemTracker does not count) or the CUDA engine (pinned slabs, not device memory).
Prints measured, estimated and the error for every (tokens, policy).
"""

from __future__ import annotations

import dataclasses
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


def microbatch(tokens: int, vocab: int, device: torch.device, single: bool = False):
    """One stream of three packed documents (half, a quarter, the rest) of seeded random tokens, or
    (``single``) one document."""
    from seqpar.train.batch import make_microbatch

    docs = [tokens] if single else [tokens // 2, tokens // 4, tokens - tokens // 2 - tokens // 4]
    ids = np.random.default_rng(0).integers(0, vocab, tokens)
    return make_microbatch(ids, np.concatenate([[0], np.cumsum(docs)]).astype(np.int32), device)


def measured_peak(cfg: ModelConfig, policy: str, tokens: int, chunk: int, device: torch.device, alpha: float = 1.0,
                  assignment=None) -> int:
    """Peak bytes of the forward and backward of a second training step (see the module doc). With
    ``assignment`` (an SPAssignment: collective over its group) the micro-batch is one document of
    ``tokens`` sharded over the group, and the peak is this rank's."""
    from seqpar.attention import build_attention
    from seqpar.memory.checkpoint import apply_memory_policy
    from seqpar.memory.transfer import HostEngine
    from seqpar.model.llama import Transformer

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:
        model = Transformer(cfg, build_attention("triton" if cuda else "reference", device))
    model.loss_chunk_tokens = chunk
    if cuda and policy in ("offload", "memo"):
        from seqpar.memory.cuda_engine import CudaEngine
        from seqpar.train.memory_setup import slab_bytes

        lay = dataclasses.replace(layout_for(device, chunk), alpha=alpha)
        engine = CudaEngine(device, cfg.n_layers - KEEP_LAST, slab_bytes(cfg, policy, lay, tokens))
    else:
        engine = HostEngine(depth=1)
    apply_memory_policy(model.layers, policy, engine=engine, keep_last=KEEP_LAST, alpha=alpha)
    opt = torch.optim.AdamW(model.parameters())

    def step(mb) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(mb.tokens, mb.ctx, labels=mb.labels)
        loss.backward()

    def batch(t: int):
        if assignment is None:
            return microbatch(t, cfg.vocab_size, device)
        from seqpar.train.batch import shard_microbatch

        return shard_microbatch(microbatch(t, cfg.vocab_size, device, single=True), assignment)

    step(batch(64))
    opt.step()
    opt.zero_grad(set_to_none=False)
    mb = batch(tokens)
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
                     chunk: int = 256, alpha: float = 0.5) -> list[MemoryRow]:
    """Measured and estimated peaks for every (tokens, policy); memo runs with ``alpha``."""
    for p in policies:
        if p not in MEMORY_POLICIES:
            raise ValueError(f"--policies: {p!r} is not one of {', '.join(MEMORY_POLICIES)}")
    lay = dataclasses.replace(layout_for(device, chunk), alpha=alpha)
    return [MemoryRow(t, p, measured_peak(cfg, p, t, chunk, device, alpha), estimate_memory(cfg, p, t, lay).peak_bytes)
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
