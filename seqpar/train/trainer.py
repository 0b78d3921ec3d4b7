"""The trainer: components built by small builders, then one loop around ``forward_backward_step``.

Launch (see README): ``seqpar train configs/tiny-cpu.yaml --nproc 2`` or directly
``torchrun --standalone --nproc_per_node 2 -m seqpar.train --config configs/tiny-cpu.yaml``.

    records = train(load_config("configs/tiny-cpu.yaml"))      # every rank; returns step records
    Trainer(cfg, model_policies=[my_policy]).train()          # the same, with a plug-in

Builders, in the order ``Trainer.__init__`` runs them (torchtitan's shape):
- parallel: ``init_distributed``; ``cfg.parallel_dims`` validates the layout; ``build_groups``
  creates the static groups once, from the group pool (``seqpar.parallel.pool``);
- data: ``open_data`` (``StepData``: which streams each step trains on) and the vocabulary;
- model: ``build.build_model``: meta device, then policies from outside (``model_policies``:
  activation checkpointing now, memory policies later), FSDP, allocation of the local shards
  only and the name-seeded init (no broadcast of full weights);
- optimizer and schedule; checkpointer (resume); metrics (step line, metrics.jsonl);
- micro-batches: ``build_micro_batches`` returns the ``MicroBatchBuilder`` that shards each
  micro-batch for its SP group (``StaticSP`` here; the adaptive executor overrides this);
- faults: test-only fault injection behind ``FaultInjector`` at the edge of the loop.

Loss rule (ARCHITECTURE.md): each rank's loss is the sum of its token losses divided by the
global number of target tokens of the step; gradients are summed over dp x sp.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from seqpar.attention import build_attention
from seqpar.config import Config, ConfigError, save_config
from seqpar.model.flops import train_flops
from seqpar.model.llama import Transformer
from seqpar.parallel.init import init_distributed
from seqpar.parallel.mesh import build_groups
from seqpar.parallel.pool import adaptive_shapes
from seqpar.train.batch import SPAssignment
from seqpar.train.build import build_model
from seqpar.train.checkpoint import Checkpointer
from seqpar.train.data_setup import open_data
from seqpar.train.errors import CollectiveFailure, TrainingError, collective_failure, first_line
from seqpar.train.faults import FaultInjector, Faults
from seqpar.train.metrics import MetricsLogger, memory_gib
from seqpar.train.microbatches import MicroBatchBuilder, StaticSP
from seqpar.train.optim import build_optimizer, build_scheduler
from seqpar.train.preemption import PreemptionFlag, write_status
from seqpar.train.step import all_reduce_sum, bad_ranks, forward_backward_step, grad_norm

__all__ = ["Trainer", "train", "TrainingError", "CollectiveFailure"]

ModelPolicy = Callable[[Transformer], None]


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def default_model_policies(cfg: Config, engine=None) -> list[ModelPolicy]:
    """Policies the config asks for, applied to the meta model before FSDP; ``engine``: the transfer
    engine of offload / memo (default: a host engine), memo's alpha resolved (not ``auto``)."""
    policies: list[ModelPolicy] = []
    if cfg.memory.policy != "none":  # model.activation_checkpointing: true is memory.policy: full
        from seqpar.memory.checkpoint import apply_memory_policy
        from seqpar.scatter.capacity import memo_alpha

        policies.append(lambda model: apply_memory_policy(model.layers, cfg.memory.policy, engine=engine,
                                                          keep_last=cfg.memory.keep_last, alpha=memo_alpha(cfg)))
    return policies


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


def _data_meta(cfg: Config, prefix: str) -> dict:
    d = cfg.data
    meta = {"path": prefix, "mode": d.mode, "seq_len": d.seq_len, "doc_mask": d.doc_mask, "seed": cfg.run.seed}
    if d.mode == "decompose":  # the bucket sequence depends on these too
        meta.update(curriculum=d.curriculum, rule=d.curriculum_rule, cycles=d.cycles, tokens_per_step=d.tokens_per_step)
    if d.mode == "varlen":
        meta.update(tokens_per_step=d.tokens_per_step)
    return meta


class Trainer:
    """Builds every component of a run on this rank (collective: all ranks construct it
    together), then ``train()`` runs or resumes the loop.

    Plug-ins: ``model_policies`` (callables applied to the meta model before FSDP; default
    from the config), ``faults`` (a ``FaultInjector``; default from the environment), and
    subclasses may override ``build_micro_batches`` (how each micro-batch is parallelised).
    """

    def __init__(self, cfg: Config, model_policies: Sequence[ModelPolicy] | None = None,
                 faults: FaultInjector | None = None) -> None:
        self.cfg = cfg
        self.info = init_distributed(timeout_s=cfg.parallel.timeout_s, flight_recorder=cfg.parallel.flight_recorder,
                                     dump_prefix=os.path.join(os.path.abspath(cfg.run.output_dir), "flight_recorder", "rank_"))
        self.dims = cfg.parallel_dims(self.info.world_size)
        extra = adaptive_shapes(self.info.world_size) if cfg.adaptive else ()
        self.groups = build_groups(self.dims, self.info.device.type, extra)
        self.device = self.info.device
        self.is_main = self.info.rank == 0
        self.run_dir = cfg.run.output_dir
        self.step_data, self.source = open_data(cfg, self.info.local_rank)
        cfg.model.vocab_size = self.source.vocab_size
        self.dtype = compute_dtype(cfg, self.device)
        local_world = self.info.local_world
        self.memo_line = ""
        if cfg.memory.policy == "memo" and cfg.memory.alpha == "auto":
            self.memo_line = self._solve_memo_alpha(local_world)  # writes memory.alpha (saved with the run)
        self.cost_model, self.cost_notes = (None, {})
        if cfg.adaptive:
            from seqpar.scatter.capacity import run_cost_model

            self.cost_model, self.cost_notes = run_cost_model(cfg, self.info.world_size, self.device, local_world)
        self.engine = self._build_engine() if cfg.memory.policy in ("offload", "memo") else None
        self.model = self.build_model(default_model_policies(cfg, self.engine) if model_policies is None else model_policies)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint.keep_latest, group=self.groups.world)
        self.ckpt.clean_partial()
        self.faults: FaultInjector = faults if faults is not None else Faults(self.info.rank)
        self.micro_batches = self.build_micro_batches()
        self.data_meta = _data_meta(cfg, self.source.prefix)

    # -- builders -----------------------------------------------------------------------------
    def _memory_layout(self):
        """(estimator layout, local tokens per micro-batch) of this run (seqpar.train.dry_run)."""
        from seqpar.train.dry_run import memory_estimates

        shards = self.dims.dp * self.dims.sp if self.cfg.parallel.fsdp else 1
        m = memory_estimates(self.cfg, self.cfg.model, self.dims, None, shards, self.device.type)
        return m["memory_layout"], m["memory_tokens"]

    def _solve_memo_alpha(self, local_world: int) -> str:
        """memory.alpha: auto -> MEMO's LP on this machine's measured numbers (collective)."""
        from seqpar.train.memory_setup import solve_memo_alpha

        layout, tokens = self._memory_layout()
        try:
            alpha, line = solve_memo_alpha(self.cfg, self.cfg.model, layout, tokens, self.device, self.dtype,
                                           local_world, self.groups.world)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.cfg.memory.alpha = alpha
        return line

    def _build_engine(self):
        """The transfer engine of offload / memo: pinned slabs for the largest micro-batch on this rank
        (adaptive: the planner's K tokens per rank)."""
        from seqpar.train.memory_setup import build_engine

        layout, tokens = self._memory_layout()
        if self.cost_model is not None:
            tokens = self.cost_model.capacity
        return build_engine(self.cfg, self.cfg.model, layout, tokens, self.device)

    def build_model(self, policies: Sequence[ModelPolicy]) -> Transformer:
        """The model on this rank: FSDP-sharded over dp x sp, or replicated (identical on every
        rank by the name-seeded init, without a broadcast)."""
        cfg = self.cfg
        try:
            attention = build_attention(cfg.kernels.attention, self.device)
        except (NotImplementedError, ValueError) as e:
            raise ConfigError(str(e)) from None
        mesh = self.groups.dp_sp_mesh if cfg.parallel.fsdp else None
        param_dtype = self.dtype if self.dtype != torch.float32 else None
        model = build_model(cfg.model, attention, self.device, cfg.run.seed, fsdp_mesh=mesh, param_dtype=param_dtype,
                            policies=policies, init_from=cfg.model.init_from)
        model.loss_chunk_tokens = cfg.memory.loss_chunk_tokens  # the LM head + loss over token chunks
        return model

    def build_micro_batches(self) -> MicroBatchBuilder:
        """Static SP: the run's one assignment (algorithm, layout, this rank's SP group) for every
        micro-batch; no SP context at sp = 1."""
        p = self.cfg.parallel
        sp = None if self.dims.sp == 1 else SPAssignment(p.algorithm, p.layout, self.groups.sp_group)
        return StaticSP(sp, self.device)

    def build_plan_source(self):
        """Rank 0's planner for adaptive runs: a planner process with ``scatter.time_limit_s``
        (``bound_time_s=0``: the bound is for reports, not training), or the static baseline of
        ``scatter.static_degree``. Subclasses (tests) may
        return ``seqpar.scatter.plan_source.ForcedPlans`` or an ``InlinePlanner``."""
        from seqpar.scatter.plan_source import PlannerProcess, StaticPlans
        from seqpar.scatter.planner import PlannerOptions

        if self.cfg.scatter.static_degree:
            return StaticPlans(self.cost_model, self.cfg.scatter.static_degree)
        opts = PlannerOptions(allow_degree1=self.cfg.scatter.allow_degree1, time_limit_s=self.cfg.scatter.time_limit_s,
                              bound_time_s=0.0, all_busy=True)
        return PlannerProcess(self.cost_model, opts)

    def build_feed(self):
        """The data feed: static SP's streams, or the adaptive executor's plans (see ``feed``)."""
        from seqpar.train.feed import AdaptiveFeed, StaticFeed

        cfg, groups, dims = self.cfg, self.groups, self.dims
        if cfg.adaptive:
            from seqpar.scatter.executor import AdaptiveExecutor

            source = self.build_plan_source() if self.is_main else None
            executor = AdaptiveExecutor(self.step_data.source, self.cost_model.capacity, groups.pool, groups.world,
                                        self.device, source, cfg.train.steps)
            return AdaptiveFeed(executor, cfg.train.steps, self.device, cfg.data.prefetch, self.faults.slow_data)
        rank_streams = lambda step, consumed: self.step_data.rank_streams(step, consumed, groups.dp_rank, dims.dp)  # noqa: E731
        return StaticFeed(rank_streams, self.micro_batches, cfg.data.streams_per_step, cfg.train.steps, self.device,
                          cfg.data.prefetch, self.faults.slow_data)

    # -- the loop -------------------------------------------------------------------------------
    def _resume(self, latest: str | None, log: MetricsLogger) -> tuple[int, int]:
        """(start step, streams consumed) from checkpoint ``latest``, or (0, 0) without one."""
        if not latest:
            return 0, 0
        try:
            state = self.ckpt.load(latest, self.model, self.optimizer)
        except (RuntimeError, ValueError, KeyError, dcp.api.CheckpointException) as e:
            raise TrainingError(
                f"checkpoint {latest} does not fit this run ({first_line(e)}); "
                "use the config it was written with (saved in its meta.json), a new run.output_dir, or delete it"
            ) from None
        self.scheduler.load_state_dict(state.scheduler)
        log.info(f"resumed from {latest} (step {state.step}, saved on {state.meta.get('world_size')} ranks)")
        if state.meta.get("data") != self.data_meta:
            log.info(
                f"warning: the data settings changed since the checkpoint ({state.meta.get('data')} -> {self.data_meta}); "
                f"the data position cannot follow exactly: continuing at stream {state.streams_consumed} of the new packing"
            )
        return state.step, state.streams_consumed

    def _log_start(self, log: MetricsLogger, peak: float | None, profile) -> None:
        cfg = self.cfg
        layout = (f"world {self.info.world_size}, adaptive (groups chosen per micro-batch)" if cfg.adaptive
                  else self.dims.describe())
        log.info(f"seqpar | {layout} | launcher {self.info.launcher} | backend {self.info.backend} | device {self.device.type} | "
                 f"fsdp {'on' if cfg.parallel.fsdp else 'off'} | data prefetch {'on' if cfg.data.prefetch else 'off'}")
        log.info(
            f"model {self.model.num_params() / 1e6:.2f}M params | data {self.source.description} | "
            f"{self.step_data.describe()} | {cfg.data.tokens_per_step:,} tokens/step | run dir {self.run_dir}"
        )
        log.info(self.groups.pool.describe())
        if cfg.adaptive:
            from seqpar.scatter.capacity import degree_summary

            cm, notes = self.cost_model, self.cost_notes
            log.info(f"adaptive: profile {notes['profile']} | K = {cm.capacity:,} tokens/rank ({notes['capacity_from']}) | "
                     f"{degree_summary(cm)} | planner time limit {cfg.scatter.time_limit_s:g} s")
        log.info(self._memory_line())
        if self.memo_line:
            log.info(self.memo_line)
        log.info(
            "FLOPs: model FLOPs (6 x matmul params per token + causal attention per document, recompute not counted); "
            f"peak {'n/a' if peak is None else f'{peak / 1e12:.1f} TFLOP/s per device'} "
            f"({profile.name if profile else 'unknown hardware'}, {str(self.dtype).replace('torch.', '')})"
        )

    def _memory_line(self) -> str:
        """The memory policy and the estimator's peak per rank for this run (seqpar.memory.estimate)."""
        from seqpar.train.dry_run import memory_estimates

        cfg = self.cfg
        shards = self.dims.dp * self.dims.sp if cfg.parallel.fsdp else 1
        m = memory_estimates(cfg, self.model.cfg, self.dims, None, shards, self.device.type)
        est = m["estimates"][cfg.memory.policy]
        host = f", host {est.host / 2**30:.2f} GiB" if est.host else ""
        return (f"memory: policy {cfg.memory.policy} | estimated peak {est.peak_bytes / 2**30:.2f} GiB per rank at "
                f"{m['memory_tokens']:,} tokens per micro-batch (saved activations {est.activations / 2**30:.2f} GiB{host}; "
                "seqpar.memory.estimate)")

    def forward_backward_step(self, micro_batches, poison: bool = False):
        """Forward and backward of this rank's micro-batches of one step (``step.forward_backward_step``)."""
        return forward_backward_step(self.model, micro_batches, self.groups.dp_sp, self.device, self.dtype,
                                     self.cfg.parallel.fsdp, poison)

    def train(self) -> list[dict]:
        """Run (or resume) training as configured; returns this process's per-step records (same on every rank)."""
        from seqpar.hardware import format_mfu, peak_flops, resolve_profile

        cfg, info, groups, dims = self.cfg, self.info, self.groups, self.dims
        # Rank 0 chooses: on a shared filesystem ranks can list different checkpoints right after a prune.
        latest = broadcast_from_rank0(self.ckpt.latest() if info.rank == 0 else None, groups.world)
        if latest and not cfg.checkpoint.resume:  # before anything is written to the run directory
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints (newest {latest}) and checkpoint.resume=false; "
                "pick a new run.output_dir for a fresh run, or delete that directory"
            )
        log = MetricsLogger(self.run_dir, cfg.train.steps, enabled=self.is_main, tensorboard=cfg.logging.tensorboard)
        try:
            start_step, consumed = self._resume(latest, log)
        except BaseException:
            log.close()
            raise
        # Records past the resumed step (or of a run that died before its first checkpoint) are redone.
        log.truncate_after(start_step)
        if self.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        try:
            profile = resolve_profile(cfg.cluster.profile, self.device)
        except ValueError as e:
            raise ConfigError(f"cluster.profile={cfg.cluster.profile!r}: {e}") from None
        peak = peak_flops(profile, "bf16" if self.dtype == torch.bfloat16 else "fp32")
        self._log_start(log, peak, profile)
        if start_step >= cfg.train.steps:
            log.info(
                f"nothing to do: {self.run_dir} already holds step {start_step} of train.steps={cfg.train.steps}; "
                "raise train.steps to continue, or pick a new run.name / run.output_dir for a fresh run"
            )
        preempt = PreemptionFlag()
        records: list[dict] = []
        step = start_step
        stopped = False
        if self.is_main:
            write_status(self.run_dir, "running", step)
        self.feed = feed = self.build_feed()
        try:
            feed.start(step, consumed)
            first = getattr(feed, "last_plan", None)
            if first is not None:
                log.info(f"adaptive: step {step + 1} plan: {first.plan.num_microbatches} micro-batches, degrees "
                         f"{first.degrees}, predicted {first.plan.predicted_step_s:.3f} s ({first.method}, "
                         f"planned in {first.solve_s:.2f} s)")
            while step < cfg.train.steps:
                t0 = time.perf_counter()
                if self.step_data.bucketed:
                    _check_same_bucket(self.step_data.source.step_bucket(step), step, groups.world, self.device)
                self.faults.hang(step + 1, lambda: preempt.requested)
                batch = feed.next(step)
                doc_lengths = batch.doc_lengths
                res = self.forward_backward_step(batch.micro_batches, self.faults.nan_loss(step + 1))
                feed.after_backward(step)
                norm = grad_norm(self.model, cfg.train.grad_clip)
                bad = bad_ranks(res.local_finite, groups.world, self.device)
                finite = not bad and math.isfinite(res.loss) and math.isfinite(norm)
                lr = self.scheduler.get_last_lr()[0]
                if finite:
                    self.optimizer.step()
                elif cfg.train.on_nan == "stop":
                    where = f"on rank {', '.join(map(str, bad))}" if bad else "after gradient reduction (all ranks)"
                    raise TrainingError(
                        f"non-finite {'loss' if bad or not math.isfinite(res.loss) else 'gradient norm'} at step {step + 1} "
                        f"{where}; last good checkpoint: {self.ckpt.latest() or 'none'}; lower train.lr, or set "
                        "train.on_nan=skip to skip such steps"
                    )
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                step += 1
                consumed += cfg.data.streams_per_step
                (flops,) = all_reduce_sum([train_flops(cfg.model, doc_lengths)], groups.dp, self.device)
                per_device = flops / elapsed / info.world_size
                record = {
                    "step": step,
                    "loss": res.loss,
                    "grad_norm": norm,
                    "lr": lr,
                    "tokens": res.tokens,
                    "targets": res.targets,
                    "step_time_s": elapsed,
                    "tflops_per_s": per_device / 1e12,
                    "mfu": None if peak is None else per_device / peak,
                    "skipped": not finite,
                    "data_wait_s": batch.data_wait_s,
                    **memory_gib(self.device),
                }
                if self.engine is not None:  # offload / memo: this rank's offloaded activations at their peak
                    record["host_peak_gib"] = self.engine.stats.peak_host_bytes / 2**30
                if batch.plan is not None:
                    p = batch.plan
                    record.update(predicted_step_s=p.plan.predicted_step_s, micro_batches=p.plan.num_microbatches,
                                  degrees=p.degrees, plan_solve_s=p.solve_s, plan_wait_s=p.wait_s)
                log.log(record, format_mfu(record["mfu"]),
                        print_line=step % cfg.logging.log_every == 0 or step in (start_step + 1, cfg.train.steps))
                records.append(record)

                stop = preempt.should_stop(groups.world, self.device)
                interval = cfg.checkpoint.interval
                due = (interval and step % interval == 0) or (step == cfg.train.steps and cfg.checkpoint.save_final) or stop
                if due:
                    meta = {"data": self.data_meta, "config": cfg.to_dict()}
                    path = self.ckpt.save(step, self.model, self.optimizer, self.scheduler, consumed, meta,
                                          fault_hook=self.faults)
                    log.info(f"checkpoint {path}")
                    self.faults("after_save", step)
                if stop:
                    log.info(f"{preempt.signal_name or 'signal'} received: checkpointed at step {step}; exiting")
                    stopped = True
                    break
        except BaseException as e:
            if self.is_main:  # the batch script must not requeue a run that failed
                write_status(self.run_dir, "failed", step, error=f"{type(e).__name__}: {first_line(e)}"[:500])
            if not isinstance(e, RuntimeError) or isinstance(e, TrainingError):
                raise
            failure = collective_failure(e, info.rank, step + 1, cfg.parallel.timeout_s, self.ckpt.latest())
            if failure is None:
                raise
            raise failure from e
        finally:
            feed.close()
            preempt.restore()
            log.close()
        if self.is_main:
            write_status(self.run_dir, "preempted" if stopped else "done", step, signal=preempt.signal_name or None)
        if records:
            log.info(f"done: step {step}/{cfg.train.steps}, final loss {records[-1]['loss']:.4f}")
        return records


def broadcast_from_rank0(value: str | None, group: dist.ProcessGroup) -> str | None:
    """Rank 0's ``value`` on every rank of ``group`` (the world; collective, once per run)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def train(cfg: Config) -> list[dict]:
    """Run (or resume) training as configured; returns this process's per-step records (same on every rank)."""
    return Trainer(cfg).train()
