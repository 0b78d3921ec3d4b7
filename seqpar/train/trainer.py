"""The training loop: data-parallel (and later sequence-parallel) steps with exact loss scaling.

Launch (see README): ``seqpar train configs/tiny-cpu.yaml --nproc 2`` or directly
``torchrun --standalone --nproc_per_node 2 -m seqpar.train --config configs/tiny-cpu.yaml``.

Loss rule (ARCHITECTURE.md): each rank's loss is the sum of its token losses divided by the
global number of target tokens of the step; gradients are summed over dp x sp. Every layout
then gives the single-device loss and gradients.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from seqpar.attention import build_attention
from seqpar.config import Config, ConfigError, save_config
from seqpar.model.flops import train_flops
from seqpar.model.llama import Transformer, token_loss_sum
from seqpar.parallel.dims import ParallelDims
from seqpar.parallel.grad_sync import all_reduce_grads
from seqpar.parallel.init import DistInfo, init_distributed
from seqpar.parallel.mesh import Groups, build_groups
from seqpar.train.batch import MicroBatch, make_microbatch, shard_microbatch
from seqpar.train.checkpoint import Checkpointer
from seqpar.train.data_setup import open_data
from seqpar.train.dry_run import check_sp_heads, micro_batches_per_rank
from seqpar.train.faults import Faults
from seqpar.train.metrics import MetricsLogger, memory_gib
from seqpar.train.optim import build_optimizer, build_scheduler
from seqpar.train.preemption import PreemptionFlag


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, checkpoint that does not fit); the message says why."""


class CollectiveFailure(TrainingError):
    """A collective timed out (parallel.timeout_s) or lost its peer: some rank stalled or died.

    Raised on the ranks that saw it, which need not include rank 0, so every rank reports it.
    """


def _collective_failure(e: RuntimeError, rank: int, step: int, timeout_s: float, last: str | None) -> TrainingError | None:
    """The one-line error for a backend exception that means a stuck or dead peer, else None.

    gloo raises plain RuntimeErrors (NCCL DistBackendErrors), so the message text decides.
    """
    text = str(e).lower()
    resume = f"last checkpoint: {last or 'none'} (rerun the same command to resume)"
    if "timed out" in text or "timeout" in text:
        return CollectiveFailure(
            f"rank {rank}: a collective timed out at step {step} after parallel.timeout_s={timeout_s:g} s: another "
            f"rank stalled or died; {resume}; raise parallel.timeout_s if steps are legitimately that slow"
        )
    if "connection closed by peer" in text or "connection reset" in text:
        return CollectiveFailure(f"rank {rank}: lost a peer at step {step}: another rank failed or was stopped "
                                 f"(see its error); {resume}")
    return None


def _compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def _all_reduce_sum(values: list[float], group: dist.ProcessGroup, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def build_model(cfg: Config, info: DistInfo, groups: Groups) -> Transformer:
    """The model on this rank: FSDP-sharded over dp x sp, or replicated (identical on every rank)."""
    torch.manual_seed(cfg.run.seed)
    try:
        attention = build_attention(cfg.kernels.attention, info.device, cfg.parallel.algorithm, groups)
    except (NotImplementedError, ValueError) as e:
        raise ConfigError(str(e)) from None
    model = Transformer(cfg.model, attention).to(info.device)
    # Same seed gives the same init, but a broadcast makes replicas identical by construction.
    if dist.get_world_size(groups.world) > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=0, group=groups.world)
    if cfg.parallel.fsdp:
        from seqpar.parallel.fsdp import apply_fsdp

        dtype = _compute_dtype(cfg, info.device)
        apply_fsdp(model, list(model.layers), groups.dp_sp_mesh, param_dtype=dtype if dtype != torch.float32 else None)
    return model


def train_step(
    model: Transformer,
    batches: list[MicroBatch],
    groups: Groups,
    cfg: Config,
    device: torch.device,
    poison: bool = False,
) -> tuple[float, int, int, bool]:
    """Forward/backward over this rank's micro-batches; gradients end up summed over dp x sp.

    Returns (global mean loss, global target tokens, global tokens, local loss finite).
    Collective over dp_sp. ``poison`` makes the local loss NaN (fault injection).
    """
    local_targets = sum(b.num_targets for b in batches)
    local_tokens = sum(b.num_tokens for b in batches)
    global_targets, global_tokens = _all_reduce_sum([local_targets, local_tokens], groups.dp_sp, device)
    denom = max(global_targets, 1.0)
    dtype = _compute_dtype(cfg, device)
    # With FSDP the mixed-precision policy casts parameters; autocast is for the replicated path.
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32 and not cfg.parallel.fsdp
        else contextlib.nullcontext()
    )
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in batches:
        with autocast:
            logits = model(b.tokens, b.ctx)
        loss = token_loss_sum(logits, b.labels) / denom
        if poison:
            loss = loss * float("nan")
        loss.backward()
        loss_sum += loss.detach().double()
    if not cfg.parallel.fsdp:
        all_reduce_grads(model.parameters(), groups.dp_sp)
    local = loss_sum.item()
    (global_loss,) = _all_reduce_sum([local], groups.dp_sp, device)
    return global_loss, int(global_targets), int(global_tokens), math.isfinite(local)


def _grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def _bad_ranks(local_ok: bool, group: dist.ProcessGroup, device: torch.device) -> list[int]:
    flags = torch.zeros(dist.get_world_size(group), device=device)
    flags[dist.get_rank(group)] = 0.0 if local_ok else 1.0
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flags, group=group)
    return [r for r, f in enumerate(flags.tolist()) if f > 0]


def _check_same_bucket(bucket: int, step: int, group: dist.ProcessGroup, device: torch.device) -> None:
    """Every rank must draw the same decomposition bucket (shared seeded schedule); collective."""
    if dist.get_world_size(group) == 1:
        return
    t = torch.tensor([bucket, -bucket], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != -int(t[1]):
        raise TrainingError(
            f"ranks drew different length buckets at step {step + 1} (from 2^{-int(t[1])} to 2^{int(t[0])}); "
            "every rank must use the same data.path, seed and curriculum"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    failures = getattr(e, "failures", None)
    if failures:  # DCP's CheckpointException: {rank: (exception, traceback)}
        first = next(iter(failures.values()))
        text = str(first[0] if isinstance(first, tuple) else first)
    return (text.splitlines() or ["unknown error"])[0][:240]


def _data_meta(cfg: Config, prefix: str) -> dict:
    d = cfg.data
    meta = {"path": prefix, "mode": d.mode, "seq_len": d.seq_len, "doc_mask": d.doc_mask, "seed": cfg.run.seed}
    if d.mode == "decompose":  # the bucket sequence depends on these too
        meta.update(curriculum=d.curriculum, rule=d.curriculum_rule, cycles=d.cycles, tokens_per_step=d.tokens_per_step)
    return meta


def train(cfg: Config) -> list[dict]:
    """Run (or resume) training as configured; returns this process's per-step records (same on every rank)."""
    info = init_distributed(timeout_s=cfg.parallel.timeout_s)
    dims = ParallelDims(cfg.parallel.dp, cfg.parallel.sp, cfg.parallel.ulysses, cfg.parallel.ring, info.world_size)
    micro_batches_per_rank(cfg.data, dims.dp)
    check_sp_heads(cfg.model, dims.ulysses)
    groups = build_groups(dims, info.device.type)
    is_main = info.rank == 0
    run_dir = cfg.run.output_dir

    step_data, source = open_data(cfg, info.local_rank)
    cfg.model.vocab_size = source.vocab_size

    from seqpar.hardware import format_mfu, peak_flops, resolve_profile

    model = build_model(cfg, info, groups)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    ckpt = Checkpointer(run_dir, cfg.checkpoint.keep_latest, group=groups.world)
    ckpt.clean_partial()
    faults = Faults(info.rank)
    data_meta = _data_meta(cfg, source.prefix)

    start_step, consumed = 0, 0
    latest = ckpt.latest()
    if latest and not cfg.checkpoint.resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (newest {latest}) and checkpoint.resume=false; "
            "pick a new run.output_dir for a fresh run, or delete that directory"
        )
    log = MetricsLogger(run_dir, cfg.train.steps, enabled=is_main, tensorboard=cfg.logging.tensorboard)
    if latest:
        try:
            state = ckpt.load(latest, model, optimizer)
        except (RuntimeError, ValueError, KeyError, dcp.api.CheckpointException) as e:
            log.close()
            raise TrainingError(
                f"checkpoint {latest} does not fit this run ({_first_line(e)}); "
                "use the config it was written with (saved in its meta.json), a new run.output_dir, or delete it"
            ) from None
        scheduler.load_state_dict(state.scheduler)
        start_step, consumed = state.step, state.streams_consumed
    # Records past the resumed step (or of a run that died before its first checkpoint) are redone.
    log.truncate_after(start_step)
    if is_main:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    if latest:
        log.info(f"resumed from {latest} (step {start_step}, saved on {state.meta.get('world_size')} ranks)")
        if state.meta.get("data") != data_meta:
            log.info(
                f"warning: the data settings changed since the checkpoint ({state.meta.get('data')} -> {data_meta}); "
                f"the data position cannot follow exactly: continuing at stream {consumed} of the new packing"
            )

    dtype = _compute_dtype(cfg, info.device)
    try:
        profile = resolve_profile(cfg.cluster.profile, info.device)
    except ValueError as e:
        raise ConfigError(f"cluster.profile={cfg.cluster.profile!r}: {e}") from None
    peak = peak_flops(profile, "bf16" if dtype == torch.bfloat16 else "fp32")
    log.info(f"seqpar | {dims.describe()} | backend {info.backend} | device {info.device.type} | fsdp {'on' if cfg.parallel.fsdp else 'off'}")
    log.info(
        f"model {model.num_params() / 1e6:.2f}M params | data {source.description} | {step_data.describe()} | "
        f"{cfg.data.tokens_per_step:,} tokens/step | run dir {run_dir}"
    )
    log.info(
        "FLOPs: model FLOPs (6 x matmul params per token + causal attention per document, recompute not counted); "
        f"peak {'n/a' if peak is None else f'{peak / 1e12:.1f} TFLOP/s per device'} "
        f"({profile.name if profile else 'unknown hardware'}, {str(dtype).replace('torch.', '')})"
    )

    if start_step >= cfg.train.steps:
        log.info(
            f"nothing to do: {run_dir} already holds step {start_step} of train.steps={cfg.train.steps}; "
            "raise train.steps to continue, or pick a new run.name / run.output_dir for a fresh run"
        )
    preempt = PreemptionFlag()
    records: list[dict] = []
    step = start_step
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            batches, doc_lengths = [], []
            if step_data.by_step:
                _check_same_bucket(step_data.source.step_bucket(step), step, groups.world, info.device)
            faults.hang(step + 1, lambda: preempt.requested)
            for s in step_data.rank_streams(step, consumed, groups.dp_rank, dims.dp):
                mb = make_microbatch(s.tokens, s.cu_seqlens, info.device)
                if dims.sp > 1:
                    mb = shard_microbatch(mb, cfg.parallel.layout, dims.ulysses, dims.ring, groups.sp_rank)
                batches.append(mb)
                doc_lengths.extend(int(n) for n in (s.cu_seqlens[1:] - s.cu_seqlens[:-1]))
            loss, targets, tokens, local_ok = train_step(model, batches, groups, cfg, info.device, faults.nan_loss(step + 1))
            grad_norm = _grad_norm(model, cfg.train.grad_clip)
            bad = _bad_ranks(local_ok, groups.world, info.device)
            finite = not bad and math.isfinite(loss) and math.isfinite(grad_norm)
            lr = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
            elif cfg.train.on_nan == "stop":
                where = f"on rank {', '.join(map(str, bad))}" if bad else "after gradient reduction (all ranks)"
                raise TrainingError(
                    f"non-finite {'loss' if bad or not math.isfinite(loss) else 'gradient norm'} at step {step + 1} {where}; "
                    f"last good checkpoint: {ckpt.latest() or 'none'}; lower train.lr, or set train.on_nan=skip to skip such steps"
                )
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            step += 1
            consumed += cfg.data.streams_per_step
            (flops,) = _all_reduce_sum([train_flops(cfg.model, doc_lengths)], groups.dp, info.device)
            per_device = flops / elapsed / info.world_size
            record = {
                "step": step,
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens": tokens,
                "targets": targets,
                "step_time_s": elapsed,
                "tflops_per_s": per_device / 1e12,
                "mfu": None if peak is None else per_device / peak,
                "skipped": not finite,
                **memory_gib(info.device),
            }
            log.log(record, format_mfu(record["mfu"]), print_line=step % cfg.logging.log_every == 0 or step in (start_step + 1, cfg.train.steps))
            records.append(record)

            stop = preempt.should_stop(groups.world, info.device)
            interval = cfg.checkpoint.interval
            due = (interval and step % interval == 0) or (step == cfg.train.steps and cfg.checkpoint.save_final) or stop
            if due:
                meta = {"data": data_meta, "config": cfg.to_dict()}
                path = ckpt.save(step, model, optimizer, scheduler, consumed, meta, fault_hook=faults)
                log.info(f"checkpoint {path}")
                faults("after_save", step)
            if stop:
                log.info(f"{preempt.signal_name or 'signal'} received: checkpointed at step {step}; exiting")
                break
    except RuntimeError as e:
        if isinstance(e, TrainingError):
            raise
        failure = _collective_failure(e, info.rank, step + 1, cfg.parallel.timeout_s, ckpt.latest())
        if failure is None:
            raise
        raise failure from e
    finally:
        preempt.restore()
        log.close()
    if records:
        log.info(f"done: step {step}/{cfg.train.steps}, final loss {records[-1]['loss']:.4f}")
    return records
