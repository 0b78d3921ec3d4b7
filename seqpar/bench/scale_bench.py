"""``seqpar bench scale``: the longest single document that trains one step under a fixed per-rank
memory budget, per memory policy, with ring SP on gloo (CPU) or NCCL.

    seqpar bench scale --model 256,8,8,4 --world 4 --budget-mib 128 --policies none,full,selective,offload,memo

Each rank's peak is measured as in ``seqpar bench memory`` (MemTracker on CPU: model, gradients,
AdamW state and activations; the host engine's numpy pool is host memory and not counted), for one
document sharded zigzag over a ring of ``world`` ranks (a second training step, replicated states).
The search starts at the estimator's longest document for the budget, brackets the measured limit
by steps of 10% and bisects it to ``resolution`` (5%); a length fits when every rank's peak is within
the budget. Runs as a torchrun job of ``world`` processes, one thread each; prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from seqpar.config import MEMORY_POLICIES, ModelConfig

#: Largest relative gap between the longest length that fit and the shortest that did not.
RESOLUTION = 0.05


@dataclass(frozen=True)
class ScaleRow:
    policy: str
    longest: int  # the longest document measured to fit
    peak: int  # its peak bytes (the largest over ranks)
    too_long: int  # the shortest document measured not to fit (0: none tried)
    estimated: int  # the estimator's longest document
    trials: int


def _estimated_longest(cfg: ModelConfig, policy: str, world: int, budget: float, alpha: float) -> int:
    from seqpar.bench.memory_bench import CPU_SCORE_BLOCK_BYTES, KEEP_LAST
    from seqpar.memory.estimate import MemoryLayout, max_tokens

    lay = MemoryLayout("ring", ring=world, precision="fp32", attention="reference", score_block_bytes=CPU_SCORE_BLOCK_BYTES,
                       loss_chunk_tokens=256, keep_last=KEEP_LAST, alpha=alpha)
    return max_tokens(cfg, policy, lay, budget) * world


def _search(fits, start: int, world: int, resolution: float, max_trials: int = 16) -> tuple[int, int, int, int]:
    """(longest fitting, its peak, shortest failing, trials): bracket from ``start`` by a step of 10%
    that squares while it keeps the same direction (the estimate is usually close, but a bad one
    must not exhaust the trials), then bisect; lengths are multiples of 2 x world (zigzag's chunks)."""
    unit = 2 * world
    snap = lambda n: max(unit, int(n) // unit * unit)  # noqa: E731
    good, good_peak, bad, trials, step = 0, 0, 0, 0, 1.1
    n = snap(start)
    while trials < max_trials:
        ok, peak = fits(n)
        trials += 1
        if ok:
            good, good_peak = n, peak
        else:
            bad = n
        if good and bad:
            if (bad - good) <= max(unit, resolution * good):
                break
            n = snap((good + bad) // 2)
            if n in (good, bad):
                break
        else:
            if not ok and n == unit:
                break  # not even the shortest length fits
            n, step = (snap(n * step) if ok else snap(n / step)), step * step
    return good, good_peak, bad, trials


def worker(cfg: ModelConfig, policies: list[str], budget: float, alpha: float, resolution: float) -> list[ScaleRow]:
    """Inside the torchrun job (every rank): the search for every policy."""
    from seqpar.bench.memory_bench import measured_peak
    from seqpar.parallel.dims import ParallelDims
    from seqpar.parallel.mesh import build_groups
    from seqpar.train.batch import SPAssignment

    world = dist.get_world_size()
    groups = build_groups(ParallelDims(1, world, 1, world, world), "cpu")
    assignment = SPAssignment("ring", "zigzag", groups.sp_group)
    device = torch.device("cpu")

    rows = []
    for policy in policies:
        def fits(n: int, policy: str = policy) -> tuple[bool, int]:
            peak = torch.tensor([measured_peak(cfg, policy, n, 256, device, alpha, assignment)], dtype=torch.int64)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            ok = int(peak) <= budget
            if dist.get_rank() == 0:  # progress: a trial takes seconds to minutes on CPU
                print(f"  {policy:<10} {n:>8,} tokens  peak {int(peak) / 2**20:7.1f} MiB  {'fits' if ok else 'too long'}",
                      flush=True)
            return ok, int(peak)

        estimated = _estimated_longest(cfg, policy, world, budget, alpha)
        good, peak, bad, trials = _search(fits, estimated, world, resolution)
        rows.append(ScaleRow(policy, good, peak, bad, estimated, trials))
    return rows


def format_table(rows: list[ScaleRow], cfg: ModelConfig, world: int, budget: float, alpha: float) -> str:
    lines = [f"seqpar bench scale: longest single document that trains one step, ring sp={world} on gloo, "
             f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, budget {budget / 2**20:.0f} MiB "
             f"per rank (MemTracker; memo alpha {alpha:g}, keep_last 2)",
             f"{'policy':<10} {'longest':>10} {'x none':>7} {'peak/rank':>11} {'fails at':>9} {'estimated':>10} {'trials':>6}"]
    base = next((r.longest for r in rows if r.policy == "none"), 0)
    for r in rows:
        ratio = f"{r.longest / base:.2f}" if base else "-"
        lines.append(f"{r.policy:<10} {r.longest:>10,} {ratio:>7} {r.peak / 2**20:>7.1f} MiB {r.too_long or '-':>9} "
                     f"{r.estimated:>10,} {r.trials:>6}")
    return "\n".join(lines)


def run_scale_bench(model: str, vocab: int, world: int, budget_mib: float, policies: list[str], alpha: float,
                    output: str, resolution: float = RESOLUTION) -> list[ScaleRow]:
    """Launch the torchrun job and read its rows back."""
    for p in policies:
        if p not in MEMORY_POLICIES:
            raise ValueError(f"--policies: {p!r} is not one of {', '.join(MEMORY_POLICIES)}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "seqpar.bench.scale_bench", "--model", model, "--vocab", str(vocab), "--budget-mib", str(budget_mib),
           "--policies", ",".join(policies), "--alpha", str(alpha), "--resolution", str(resolution), "--output", output]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as job:
        assert job.stdout is not None
        for line in job.stdout:  # the trials as they finish (rank 0), and the tail for an error
            tail.append(line)
            if line.startswith("  "):
                print(line, end="", file=sys.stderr, flush=True)
    if job.returncode != 0:
        raise RuntimeError(f"seqpar bench scale: the {world}-rank job failed (exit {job.returncode}):\n{''.join(tail)}")
    with open(output) as f:
        return [ScaleRow(**r) for r in json.load(f)["rows"]]


def model_config(model: str, vocab: int) -> ModelConfig:
    """``dim,layers,heads,kv_heads`` -> the model config."""
    dim, layers, heads, kv = (int(x) for x in model.split(","))
    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, vocab_size=vocab)


def main(argv: list[str] | None = None) -> int:
    """The torchrun job's entry point (``run_scale_bench`` builds its command line)."""
    p = argparse.ArgumentParser(prog="seqpar.bench.scale_bench")
    p.add_argument("--model", required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--budget-mib", type=float, required=True)
    p.add_argument("--policies", required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--resolution", type=float, default=RESOLUTION)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        cfg = model_config(a.model, a.vocab)
        rows = worker(cfg, a.policies.split(","), a.budget_mib * 2**20, a.alpha, a.resolution)
        if dist.get_rank() == 0:
            with open(a.output, "w") as f:
                json.dump({"model": a.model, "vocab": a.vocab, "world": dist.get_world_size(), "budget_mib": a.budget_mib,
                           "alpha": a.alpha, "rows": [asdict(r) for r in rows]}, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
