"""The training loop: data-parallel (and later sequence-parallel) steps with exact loss scaling.

Launch (see README): ``seqpar train configs/tiny-cpu.yaml --nproc 2`` or directly
``torchrun --standalone --nproc_per_node 2 -m seqpar.train --config configs/tiny-cpu.yaml``.

Loss rule (ARCHITECTURE.md): each rank's loss is the sum of its token losses divided by the
global number of target tokens of the step; gradients are summed over dp x sp. Every layout
then gives the single-device loss and gradients.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from seqpar.attention import build_attention
from seqpar.config import Config, ConfigError, save_config
from seqpar.model.flops import train_flops
from seqpar.model.llama import Transformer, token_loss_sum
from seqpar.parallel.dims import ParallelDims
from seqpar.parallel.grad_sync import all_reduce_grads
from seqpar.parallel.init import init_distributed
from seqpar.parallel.mesh import Groups, build_groups
from seqpar.train.batch import MicroBatch, make_microbatch
from seqpar.train.data_setup import open_data
from seqpar.train.metrics import MetricsLogger, memory_gib
from seqpar.train.optim import build_optimizer, build_scheduler


def _streams_for_rank(cfg: Config, dims: ParallelDims, dp_rank: int, step: int) -> list[int]:
    """Global stream indices of one optimizer step that this dp rank trains on (micro-batches in order)."""
    per_step = cfg.data.streams_per_step
    per_rank = per_step // dims.dp
    base = step * per_step + dp_rank * per_rank
    return list(range(base, base + per_rank))


def _check_batch_layout(cfg: Config, dims: ParallelDims) -> None:
    if cfg.data.streams_per_step % dims.dp != 0:
        raise ConfigError(
            f"data.tokens_per_step={cfg.data.tokens_per_step} holds {cfg.data.streams_per_step} streams of "
            f"data.seq_len={cfg.data.seq_len}, which does not split over dp={dims.dp} ranks; "
            f"make data.tokens_per_step a multiple of {cfg.data.seq_len * dims.dp}"
        )


def _autocast(cfg: Config, device: torch.device):
    want_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    if want_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _broadcast_params(model: torch.nn.Module, group: dist.ProcessGroup) -> None:
    # Same seed gives the same init, but a broadcast makes replicas identical by construction.
    if dist.get_world_size(group) > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=dist.get_global_rank(group, 0), group=group)


def _all_reduce_sum(values: list[float], group: dist.ProcessGroup, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def train_step(
    model: Transformer,
    batches: list[MicroBatch],
    groups: Groups,
    cfg: Config,
    device: torch.device,
) -> tuple[float, int, int]:
    """Forward/backward over the step's micro-batches of this rank; grads summed over dp x sp.

    Returns (global mean loss, global target tokens, global tokens). Collective over dp_sp.
    """
    local_targets = sum(b.num_targets for b in batches)
    local_tokens = sum(b.num_tokens for b in batches)
    global_targets, global_tokens = _all_reduce_sum([local_targets, local_tokens], groups.dp_sp, device)
    denom = max(global_targets, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in batches:
        with _autocast(cfg, device):
            logits = model(b.tokens, b.ctx)
        loss = token_loss_sum(logits, b.labels) / denom
        loss.backward()
        loss_sum += loss.detach().double()
    all_reduce_grads(model.parameters(), groups.dp_sp)
    (global_loss,) = _all_reduce_sum([loss_sum.item()], groups.dp_sp, device)
    return global_loss, int(global_targets), int(global_tokens)


def train(cfg: Config) -> list[dict]:
    """Run training as configured; returns the per-step records (identical on every rank)."""
    info = init_distributed()
    dims = ParallelDims(cfg.parallel.dp, cfg.parallel.sp, cfg.parallel.ulysses, cfg.parallel.ring, info.world_size)
    _check_batch_layout(cfg, dims)
    groups = build_groups(dims, info.device.type)
    is_main = info.rank == 0
    log = MetricsLogger(cfg.run.output_dir, cfg.train.steps, enabled=is_main)

    store, source = open_data(cfg, info.local_rank)
    cfg.model.vocab_size = source.vocab_size
    if is_main:
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run.output_dir, "config.yaml"))

    from seqpar.data.streams import PackedStreams

    streams = PackedStreams(store, mode=cfg.data.mode, seq_len=cfg.data.seq_len, seed=cfg.run.seed, doc_mask=cfg.data.doc_mask)

    torch.manual_seed(cfg.run.seed)
    attention = build_attention(cfg.kernels.attention, info.device, sp=dims.sp)
    model = Transformer(cfg.model, attention).to(info.device)
    _broadcast_params(model, groups.world)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)

    log.info(f"seqpar | {dims.describe()} | backend {info.backend} | device {info.device.type}")
    log.info(
        f"model {model.num_params() / 1e6:.2f}M params | data {source.description}: {store.num_docs:,} docs, "
        f"{store.num_tokens:,} tokens | {streams.describe()} | {cfg.data.tokens_per_step:,} tokens/step | run dir {cfg.run.output_dir}"
    )

    records = []
    dp_rank = groups.dp_rank
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        batches = []
        doc_lengths: list[int] = []
        for i in _streams_for_rank(cfg, dims, dp_rank, step):
            s = streams[i]
            batches.append(make_microbatch(s.tokens, s.cu_seqlens, info.device))
            doc_lengths.extend(int(n) for n in (s.cu_seqlens[1:] - s.cu_seqlens[:-1]))
        loss, targets, tokens = train_step(model, batches, groups, cfg, info.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        (flops,) = _all_reduce_sum([train_flops(cfg.model, doc_lengths)], groups.dp, info.device)
        record = {
            "step": step + 1,
            "loss": loss,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "tokens": tokens,
            "targets": targets,
            "step_time_s": elapsed,
            "tflops_per_s": flops / elapsed / 1e12,
            **memory_gib(info.device),
        }
        log.log(record, print_line=(step + 1) % cfg.logging.log_every == 0 or step == 0 or step + 1 == cfg.train.steps)
        records.append(record)
    log.info(f"done: {cfg.train.steps} steps, final loss {records[-1]['loss']:.4f}")
    log.close()
    return records
