"""``seqpar bench scaling``: step time, tokens/s, TFLOP/s, peak memory and bytes per rank of every SP
algorithm (ring, Ulysses, hybrid, adaptive) and degree over a range of sequence lengths.

    seqpar bench scaling --quick --output /tmp/scaling      # < 1 min on 2 cores (the tests run it)
    seqpar bench scaling --output runs/bench-scaling        # < 10 min on 2 cores
    seqpar bench scaling --lengths 8192,32768,131072        # GPU: one device, several lengths + kernels

Workload of a row of length L: one step of one packed stream of four documents (L/2, L/4, L/8,
L/8: the adaptive planner has something to place), the same seeded tokens for every arm, AdamW,
fp32 on CPU. The baseline is sp=1 in one process (local attention) measured in the same run;
every other arm spawns one gloo process group per degree (``torch.set_num_threads(1)`` in every
rank) and runs all its lengths and algorithms inside it. Static arms shard the stream over one
group of ``degree`` ranks (zigzag for ring and hybrid, contiguous for Ulysses); the adaptive arm
runs the plan of ``seqpar.scatter.planner.plan_step`` (deterministic) over the same ranks.

Per (algorithm, degree, length): a warm-up step; one step under MemTracker (peak bytes per rank:
parameters, gradients, AdamW state, activations) with ``seqpar.parallel.comm.COUNTERS`` reset
(bytes each rank hands to the SP collectives, forward + backward; the gradient all-reduce, the same
for every algorithm at a degree, is not counted); then, when timed, the median of ``steps`` steps.
Only degrees <= min(2, cores) are timed: more ranks than cores take turns on them, so degrees 4
and 8 are measured for memory and bytes only and every output marks its timed rows. Predicted step
times and bytes come from the adaptive planner's cost model (``cluster/profiles/cpu.yaml``).
The pure parts (specs, rows, predictions, tables, plots) live in :mod:`seqpar.bench.scaling_report`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist

from seqpar.config import ModelConfig

from seqpar.bench.scaling_report import (
    ScalingRow,
    ScalingSpec,
    cost_model,
    doc_lengths,
    predicted,
    static_split,
)


# ---- one step, on every rank of a group (or the baseline's one process) -----------------------------


class _Arm:
    """A fresh model (seed 0) and AdamW running one algorithm's micro-batches on this rank."""

    def __init__(self, cfg: ModelConfig, device: torch.device, micro_batches: list, targets: int,
                 group: dist.ProcessGroup | None) -> None:
        from seqpar.attention import build_attention
        from seqpar.model.llama import Transformer

        torch.manual_seed(0)
        with device:
            self.model = Transformer(cfg, build_attention("auto", device))
        self.model.loss_chunk_tokens = 4096
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.micro_batches, self.targets, self.group, self.device = micro_batches, targets, group, device

    def forward_backward(self) -> None:
        from seqpar.parallel.grad_sync import all_reduce_grads

        cuda = self.device.type == "cuda"
        for mb in self.micro_batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = self.model(mb.tokens, mb.ctx, labels=mb.labels) / self.targets
            loss.backward()
        if self.group is not None:
            all_reduce_grads(self.model.parameters(), self.group)

    def step(self) -> float:
        """One training step; its seconds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # a benchmark: the step's end is measured
        return time.perf_counter() - t0

    def tracked(self) -> tuple[int, int]:
        """(peak bytes, SP bytes sent) of one forward + backward after the warm-up step."""
        from torch.distributed._tools.mem_tracker import MemTracker

        from seqpar.parallel.comm import COUNTERS

        COUNTERS.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.forward_backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            tracker = MemTracker()
            tracker.track_external(self.model, self.opt)
            with tracker:
                self.forward_backward()
            peak = int(tracker.get_tracker_snapshot("peak")[self.device]["Total"])
        sent = COUNTERS.total()
        self.opt.zero_grad(set_to_none=False)
        return peak, sent

    def measure(self, steps: int, timed: bool) -> tuple[float, int, int]:
        """(median step seconds or NaN, peak bytes, bytes sent): warm-up, tracked step, timed steps."""
        self.step()
        peak, sent = self.tracked()
        times = [self.step() for _ in range(steps)] if timed else []
        return (statistics.median(times) if times else math.nan), peak, sent


def _stream(seq_len: int, vocab: int, device: torch.device, docs: list[int] | None = None):
    from seqpar.train.batch import make_microbatch

    docs = doc_lengths(seq_len) if docs is None else docs
    ids = np.random.default_rng(seq_len).integers(0, vocab, sum(docs))
    return make_microbatch(ids, np.concatenate([[0], np.cumsum(docs)]).astype(np.int32), device)


def run_baseline(spec: ScalingSpec, device: torch.device) -> list[ScalingRow]:
    """sp=1 in this process, one thread on CPU (restored afterwards): one row per length."""
    from seqpar.model.flops import train_flops

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        rows = []
        for n in spec.lengths:
            mb = _stream(n, spec.model.vocab_size, device)
            step_s, peak, sent = _Arm(spec.model, device, [mb], mb.targets, None).measure(spec.steps, True)
            secs, nbytes = predicted(spec.model, "local", 1, doc_lengths(n)) if device.type == "cpu" else (math.nan,) * 2
            rows.append(ScalingRow("baseline", 1, 1, 1, n, True, step_s, train_flops(spec.model, doc_lengths(n)), peak,
                                   sent, secs, nbytes, device=device.type))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return rows
    finally:
        torch.set_num_threads(threads)


def _static_row(spec: ScalingSpec, pool, algorithm: str, u: int, r: int, n: int) -> ScalingRow:
    """Collective over the world: one static arm at length n on the pool group of all ranks."""
    from seqpar.model.flops import train_flops
    from seqpar.train.batch import SPAssignment, shard_microbatch

    world = dist.get_world_size()
    layout = "contiguous" if algorithm == "ulysses" else "zigzag"
    full = _stream(n, spec.model.vocab_size, torch.device("cpu"))
    mb = shard_microbatch(full, SPAssignment(algorithm, layout, pool.get(0, world, u)))
    step_s, peak, sent = _Arm(spec.model, torch.device("cpu"), [mb], full.targets, dist.group.WORLD).measure(
        spec.steps, spec.timed(world))
    secs, nbytes = predicted(spec.model, algorithm, world, doc_lengths(n))
    return ScalingRow(algorithm, world, u, r, n, spec.timed(world), step_s, train_flops(spec.model, doc_lengths(n)),
                      peak, sent, secs, nbytes)


def _adaptive_row(spec: ScalingSpec, pool, n: int) -> ScalingRow:
    """Collective over the world: the planner's groups (deterministic plan, the same on every rank)."""
    from seqpar.model.flops import train_flops
    from seqpar.scatter.executor import group_assignment
    from seqpar.scatter.planner import PlannerOptions, plan_step
    from seqpar.train.batch import empty_microbatch, make_microbatch, shard_microbatch

    world, rank = dist.get_world_size(), dist.get_rank()
    docs = doc_lengths(n)
    res = plan_step(cost_model(spec.model, world), docs, PlannerOptions(time_limit_s=None, bound_time_s=0))
    full = _stream(n, spec.model.vocab_size, torch.device("cpu"))
    tokens = full.tokens.numpy()
    starts = np.concatenate([[0], np.cumsum(docs)])
    mbs = []
    for g in res.plan.groups_of_rank(rank):
        if g is None:
            mbs.append(empty_microbatch(torch.device("cpu")))
            continue
        ids = list(g.seq_ids)
        mb = make_microbatch(np.concatenate([tokens[starts[i]:starts[i + 1]] for i in ids]),
                             np.concatenate([[0], np.cumsum([docs[i] for i in ids])]).astype(np.int32), torch.device("cpu"))
        sp = group_assignment(g, pool)
        mbs.append(mb if sp is None else shard_microbatch(mb, sp))
    step_s, peak, sent = _Arm(spec.model, torch.device("cpu"), mbs, full.targets, dist.group.WORLD).measure(
        spec.steps, spec.timed(world))
    groups = " | ".join("+".join(f"{g.algorithm}{g.degree}" if g.degree > 1 else "1" for g in m.groups)
                        for m in res.plan.micro_batches)
    return ScalingRow("adaptive", world, 0, 0, n, spec.timed(world), step_s, train_flops(spec.model, docs), peak, sent,
                      res.predicted_step_s, math.nan, groups)


def _largest(rows: list[ScalingRow]) -> list[ScalingRow]:
    """Every rank's rows to one list: peak and bytes the largest over ranks, time the slowest rank's."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    out = []
    for per_rank in zip(*gathered):
        r0 = per_rank[0]
        out.append(dataclasses.replace(r0, peak_bytes=max(r.peak_bytes for r in per_rank),
                                       bytes_sent=max(r.bytes_sent for r in per_rank),
                                       step_s=max(r.step_s for r in per_rank) if r0.timed else math.nan))
    return out


def group_rows(spec: ScalingSpec) -> list[ScalingRow]:
    """Inside a spawned group (every rank): every algorithm at every length, degree = world size."""
    from seqpar.parallel.pool import GroupPool, adaptive_shapes

    world = dist.get_world_size()
    pool = GroupPool.build(adaptive_shapes(world))  # every aligned group and split, created once (collective)
    rows = []
    for n in spec.lengths:
        for a in spec.algorithms:
            if a == "adaptive":
                rows.append(_adaptive_row(spec, pool, n))
                continue
            split = static_split(spec.model, a, world)
            if split is not None:
                rows.append(_static_row(spec, pool, a, *split, n))
    return _largest(rows)


# ---- processes --------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, store_path: str, spec: ScalingSpec, queue) -> None:
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        # a file store in a fresh directory: no port is picked here and bound later by another process
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        rows = group_rows(spec)
        if rank == 0:
            queue.put(("ok", rows))
        dist.destroy_process_group()
    except BaseException:
        queue.put(("error", f"rank {rank}: {traceback.format_exc()}"))


def run_group(spec: ScalingSpec, world: int, timeout_s: float = 1200.0) -> list[ScalingRow]:
    """Spawn ``world`` gloo ranks (one thread each) and return their rows (a hang fails after timeout_s)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="seqpar-bench-store-")
    procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(store_dir, "store"), spec, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        status, payload = queue.get(timeout=timeout_s)
    except Exception:
        status, payload = "error", f"no result from the {world}-rank group within {timeout_s:.0f} s"
    for p in procs:
        p.join(timeout=30 if status == "ok" else 1)
        if p.is_alive():
            p.kill()
    shutil.rmtree(store_dir, ignore_errors=True)
    if status != "ok":
        raise RuntimeError(f"seqpar bench scaling: the {world}-rank group failed:\n{payload}")
    return payload


def run_gpu(spec: ScalingSpec) -> list[ScalingRow]:
    """One CUDA device: the baseline at every length (bf16 autocast, the auto kernel) with MFU."""
    from seqpar.hardware import peak_flops, resolve_profile

    device = torch.device("cuda")
    peak = peak_flops(resolve_profile("auto", device), "bf16")
    return [dataclasses.replace(r, peak_flops=peak or math.nan) for r in run_baseline(spec, device)]


def gpu_kernel_table(spec: ScalingSpec, progress=print) -> str:
    """The device's attention-kernel numbers (``seqpar bench kernels``) at the bench's lengths and heads,
    as a fenced block for scaling.md; a one-line reason when they cannot be measured."""
    from seqpar.bench.kernel_bench import format_table, run_kernel_bench

    try:
        rows = run_kernel_bench(list(spec.lengths), heads=spec.model.n_heads, head_dim=spec.model.head_dim,
                                tokens=max(spec.lengths), repeats=3, progress=progress)
    except Exception as e:  # a missing optional kernel must not lose the scaling rows
        return f"Kernel numbers: not measured ({type(e).__name__}: {e})."
    return "## Attention kernels on this device (seqpar bench kernels)\n\n```\n" + format_table(rows, "sdpa_flash") + "\n```"


def run_scaling_bench(spec: ScalingSpec, progress=print) -> list[ScalingRow]:
    """The baseline, then one spawned group per degree (CPU); or one GPU at several lengths.
    Never touches CUDA unless ``torch.cuda.is_available()``."""
    if torch.cuda.is_available():
        return run_gpu(spec)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    rows = run_baseline(spec, device)
    progress(f"baseline sp=1: {len(rows)} length(s) in {time.perf_counter() - t0:.0f} s")
    for d in spec.degrees:
        t0 = time.perf_counter()
        got = run_group(spec, d)
        progress(f"degree {d}{'' if spec.timed(d) else ' (memory and bytes only)'}: {len(got)} row(s) in "
                 f"{time.perf_counter() - t0:.0f} s")
        rows += got
    return rows
