"""Validate a run's layout for N ranks and describe it, without starting anything (pure).

    seqpar train configs/llama-1b-128k.yaml --dry-run --world-size 8
    print(dry_run_report(load_config("configs/llama-1b-128k.yaml"), world_size=8))

No process group, no data loading, no corpus build: the model is built on the meta device to
count parameters, and the vocabulary comes from the config or the tokenizer. Errors are the ones
the trainer would raise at start-up (ParallelDimsError, ConfigError), one line each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from seqpar.config import (MEMORY_POLICIES, Config, ConfigError, ModelConfig, check_sp_heads,  # noqa: F401 (re-exported)
                           micro_batches_per_rank)
from seqpar.hardware import HardwareProfile, load_profile, peak_flops
from seqpar.memory.estimate import (USABLE_FRACTION, MemoryEstimate, MemoryLayout, attention_kind, estimate_memory,
                                    max_tokens, precision_of, static_layout)
from seqpar.model.flops import flops_per_token
from seqpar.parallel.dims import ParallelDims, ulysses_head_error

#: Ranks up to which the report lists every rank's coordinates and groups.
_LIST_RANKS_UP_TO = 16
_GIB = 2**30


def resolve_vocab_size(cfg: Config) -> tuple[int, str]:
    """(vocab_size, where it came from). 0 in the config means the tokenizer's, rounded up to 64 as
    the trainer does (a store's metadata, read only at launch, may name another tokenizer)."""
    if cfg.model.vocab_size > 0:
        return cfg.model.vocab_size, "model.vocab_size"
    from seqpar.data.tokenizer import load_tokenizer, padded_vocab_size

    tok = load_tokenizer(cfg.data.tokenizer)
    return padded_vocab_size(cfg.data.tokenizer), f"tokenizer {cfg.data.tokenizer!r} ({tok.vocab_size}) rounded up to 64"


def _no_attention(q, k, v, ctx):  # the meta model is never run
    raise RuntimeError("the dry-run model has no attention")


def count_params(model_cfg: ModelConfig) -> tuple[int, int]:
    """(total parameters, parameters of one transformer block), tied weights counted once.

    Built on the meta device: shapes only, no memory, no initialisation cost.
    """
    from seqpar.model.llama import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg, attention=_no_attention)
    block = sum(p.numel() for p in model.layers[0].parameters())
    return model.num_params(), block


@dataclass
class DryRunPlan:
    """Everything the report prints, as numbers (tests and tools read these)."""

    dims: ParallelDims
    seq_len: int
    tokens_per_step: int
    streams_per_step: int
    micro_batches_per_rank: int
    tokens_per_rank: float  # seq_len / sp; not an integer when shards are uneven
    vocab_size: int
    vocab_source: str
    num_params: int
    block_params: int
    state_shards: int  # dp x sp with FSDP, 1 when replicated
    param_bytes: float  # per rank, fp32 master weights
    grad_bytes: float  # per rank, fp32
    optim_bytes: float  # per rank, AdamW exp_avg + exp_avg_sq in fp32
    bf16_copy_bytes: float | None  # bf16 compute copies on CUDA, None when the run is fp32
    flops_per_token: float
    flops_per_step: float
    profile: HardwareProfile | None
    adaptive: list[str] | None = None  # the adaptive pool's lines (parallel.algorithm=adaptive)
    memory_layout: MemoryLayout | None = None
    memory_tokens: int = 0  # local tokens per micro-batch the estimates are for
    estimates: dict[str, MemoryEstimate] = dataclasses.field(default_factory=dict)  # by memory policy
    usable_bytes: float | None = None  # device memory the estimates must fit (profile x USABLE_FRACTION)
    longest: dict[str, int] = dataclasses.field(default_factory=dict)  # local tokens that fit, by policy
    memo_alpha: str = ""  # how memo's alpha was chosen (memory.alpha, or MEMO's LP from the profile)

    @property
    def state_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optim_bytes


def plan_dry_run(cfg: Config, world_size: int) -> DryRunPlan:
    """Validate ``cfg`` for ``world_size`` ranks and compute the plan (pure; raises on bad layouts)."""
    p = cfg.parallel
    dims = cfg.parallel_dims(world_size)  # the trainer's own validation
    mb = micro_batches_per_rank(cfg.data, dims.dp)
    vocab, vocab_source = resolve_vocab_size(cfg)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    n, block = count_params(model_cfg)
    shards = dims.dp * dims.sp if p.fsdp else 1
    # bf16 copies exist when autocast runs in bf16: train.dtype bf16, or auto on CUDA.
    bf16 = None
    if cfg.train.dtype in ("bf16", "auto"):
        # Replicated: autocast keeps a bf16 copy of every weight during the forward. FSDP gathers
        # block by block: about two blocks in flight (prefetch) plus embeddings and head.
        bf16 = 2.0 * ((n - (model_cfg.n_layers - 2) * block) if p.fsdp and model_cfg.n_layers > 2 else n)
    fpt = flops_per_token(model_cfg, [cfg.data.seq_len], causal=True)
    profile = None if cfg.cluster.profile == "auto" else load_profile(cfg.cluster.profile)
    adaptive = _adaptive_lines(dataclasses.replace(cfg, model=model_cfg), world_size) if cfg.adaptive else None
    memory = memory_estimates(cfg, model_cfg, dims, profile, shards)
    return DryRunPlan(
        **memory,
        adaptive=adaptive,
        dims=dims,
        seq_len=cfg.data.seq_len,
        tokens_per_step=cfg.data.tokens_per_step,
        streams_per_step=cfg.data.streams_per_step,
        micro_batches_per_rank=mb,
        tokens_per_rank=cfg.data.seq_len / dims.sp,
        vocab_size=vocab,
        vocab_source=vocab_source,
        num_params=n,
        block_params=block,
        state_shards=shards,
        param_bytes=4.0 * n / shards,
        grad_bytes=4.0 * n / shards,
        optim_bytes=8.0 * n / shards,
        bf16_copy_bytes=bf16,
        flops_per_token=fpt,
        flops_per_step=fpt * cfg.data.tokens_per_step,
        profile=profile,
    )


def memory_estimates(cfg: Config, model_cfg: ModelConfig, dims: ParallelDims, profile: HardwareProfile | None,
                      shards: int, device_type: str | None = None, alpha: float | None = None) -> dict:
    """Per-policy estimates for this run's layout at its tokens per rank (seq_len / sp; adaptive: the
    longest sequence over the whole pool, in the layout that holds the most per token), and the
    longest shard that fits the profile's device memory. ``device_type``
    defaults to the profile's kind (CUDA unless it is the cpu profile; this machine's without one).
    memo's ``alpha``: given (the trainer's, solved from measurements), ``memory.alpha``, or MEMO's
    LP on the profile's numbers (``memo_alpha_from_profile``)."""
    if device_type is None:
        gpu = (profile is not None and not profile.name.startswith("cpu")) or (profile is None and torch.cuda.is_available())
        device_type = "cuda" if gpu else "cpu"
    precision = precision_of(cfg.train.dtype, cfg.parallel.fsdp, device_type)
    attention = attention_kind(cfg.kernels.attention, device_type)
    if cfg.adaptive:  # the layout that sets K: the largest group of the most memory-hungry algorithm
        layout = MemoryLayout("ulysses", ulysses=dims.world_size, state_shards=shards, precision=precision,
                              attention=attention, loss_chunk_tokens=cfg.memory.loss_chunk_tokens)
        if ulysses_head_error(model_cfg.n_heads, model_cfg.n_kv_heads, dims.world_size) is not None:
            layout = dataclasses.replace(layout, algorithm="ring", ulysses=1, ring=dims.world_size)
    else:
        layout = static_layout((dims.ulysses, dims.ring), shards, precision, attention, cfg.memory.loss_chunk_tokens)
    layout = dataclasses.replace(layout, keep_last=cfg.memory.keep_last, depth=cfg.memory.depth)
    tokens = -(-cfg.data.seq_len // dims.sp)
    if alpha is not None:
        how = f"memo alpha {alpha:.3f} (solved at start-up)"
    elif cfg.memory.alpha != "auto":
        alpha, how = float(cfg.memory.alpha), f"memo alpha {float(cfg.memory.alpha):.3f} (memory.alpha)"
    else:
        alpha, how = memo_alpha_from_profile(cfg, model_cfg, layout, tokens, profile)
    layout = dataclasses.replace(layout, alpha=alpha)
    estimates = {p: estimate_memory(model_cfg, p, tokens, layout) for p in MEMORY_POLICIES}
    usable = None
    longest: dict[str, int] = {}
    if profile is not None and profile.device_memory_gib is not None:
        usable = USABLE_FRACTION * profile.device_memory_gib * _GIB
        longest = {p: max_tokens(model_cfg, p, layout, usable) for p in MEMORY_POLICIES}
    return {"memory_layout": layout, "memory_tokens": tokens, "estimates": estimates, "usable_bytes": usable,
            "longest": longest, "memo_alpha": how}


#: Device-to-host bandwidth assumed when the profile has no ``host_bw_gbps`` (PCIe 4 x16, pinned).
DEFAULT_HOST_BW_GBPS = 25.0


def memo_alpha_from_profile(cfg: Config, model_cfg: ModelConfig, layout: MemoryLayout, tokens: int,
                            profile: HardwareProfile | None) -> tuple[float, str]:
    """``memory.alpha: auto`` before any measurement: MEMO's LP with the block forward predicted at
    50% MFU of the profile's bf16 peak, its ``host_bw_gbps`` and ``memory.host_budget_gib`` (else the
    profile's host memory over 8 ranks; else unbounded). (alpha, how it was chosen)."""
    from seqpar.memory.alpha import alpha_problem, format_solution, predicted_forward_s, solve_alpha

    peak = peak_flops(profile, "bf16") if profile is not None else None
    if peak is None:
        return 1.0, "memo alpha 1 (memory.alpha=auto needs a hardware profile to solve MEMO's LP before start-up)"
    bw = float(profile.extra.get("host_bw_gbps", DEFAULT_HOST_BW_GBPS)) * 1e9
    if cfg.memory.host_budget_gib > 0:
        budget = cfg.memory.host_budget_gib * _GIB
    elif profile.host_memory_gib is not None:
        budget = profile.host_memory_gib * _GIB / 8
    else:
        budget = float("inf")
    problem = alpha_problem(model_cfg, layout, tokens, predicted_forward_s(model_cfg, tokens, cfg.data.seq_len, peak),
                            bw, budget)
    try:
        solution = solve_alpha(problem)
    except ValueError as e:
        return 0.0, f"memo alpha 0, and memo cannot run: {e}"
    return solution.alpha, format_solution(problem, solution, "MEMO's LP, predicted forward at 50% MFU")


# ---------------------------------------------------------------------------------------------
# Formatting.


def _groups(dims: ParallelDims, axis: str) -> list[list[int]]:
    """Rank lists of the groups along one mesh axis ("ulysses", "ring", "sp" or "dp")."""
    others = [a for a in ("dp", "ring", "ulysses") if a != axis and not (axis == "sp" and a in ("ring", "ulysses"))]
    found: dict[tuple, list[int]] = {}
    for r in range(dims.world_size):
        c = dims.coordinates(r)
        found.setdefault(tuple(c[a] for a in others), []).append(r)
    return list(found.values())


def _fmt_groups(groups: list[list[int]]) -> str:
    return " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)


def _mesh_lines(dims: ParallelDims) -> list[str]:
    lines = [f"mesh      {dims.describe()}; ranks laid out dp x ring x ulysses (outermost first)"]
    u, sp = dims.ulysses, dims.sp
    if dims.world_size <= _LIST_RANKS_UP_TO:
        lines.append("          rank  dp  sp  ring  ulysses")
        for r in range(dims.world_size):
            c = dims.coordinates(r)
            lines.append(f"          {r:>4}  {c['dp']:>2}  {c['sp']:>2}  {c['ring']:>4}  {c['ulysses']:>7}")
        for axis in ("ulysses", "ring", "dp"):
            lines.append(f"          {axis + ' groups':<15} {_fmt_groups(_groups(dims, axis))}")
    else:
        lines.append(f"          ulysses groups: {_stride_text(u, 1)}; keep each inside one node (NVLink)")
        lines.append(f"          ring groups:    {_stride_text(dims.ring, u)}")
        lines.append(f"          dp groups:      {_stride_text(dims.dp, sp)}")
        for r in (0, dims.world_size - 1):
            c = dims.coordinates(r)
            lines.append(f"          rank {r}: dp {c['dp']}, sp {c['sp']} (ring {c['ring']}, ulysses {c['ulysses']})")
    return lines


def _stride_text(size: int, stride: int) -> str:
    if size == 1:
        return "1 rank each (degree 1: no communication)"
    members = ", ".join(str(i * stride) for i in range(min(size, 3))) + (", ..." if size > 3 else "")
    kind = "adjacent ranks" if stride == 1 else f"ranks strided by {stride}"
    return f"{size} {kind} (the first: {members})"


def _fmt_bytes(x: float) -> str:
    return f"{x / _GIB:8.2f} GiB" if x >= 0.1 * _GIB else f"{x / 2**20:8.2f} MiB"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def _adaptive_lines(cfg: Config, world: int) -> list[str]:
    """The trainer's cost model for an adaptive run (its errors are the trainer's), as report lines."""
    import torch

    from seqpar.scatter.capacity import degree_summary, run_cost_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cm, notes = run_cost_model(cfg, world, device, local_world=world)
    return [
        f"adaptive  world {world} as one pool: groups of {degree_summary(cm)}; chosen per micro-batch by the planner "
        f"(scatter.time_limit_s={cfg.scatter.time_limit_s:g})",
        f"tokens    varlen steps: whole documents up to {cfg.data.tokens_per_step:,} tokens per step, cut at "
        f"data.seq_len={cfg.data.seq_len:,}; K = {cm.capacity:,} tokens per rank ({notes['capacity_from']}, "
        f"profile {notes['profile']} on {device.type})",
    ]


def format_report(plan: DryRunPlan, cfg: Config) -> str:
    """The human-readable report of a plan."""
    d = plan.dims
    lines = _mesh_lines(d) if plan.adaptive is None else list(plan.adaptive)
    if plan.adaptive is not None:
        pass
    elif plan.seq_len % d.sp == 0:
        per_rank = f"{int(plan.tokens_per_rank):,} tokens per rank (seq_len / sp)"
    else:
        per_rank = (
            f"{plan.tokens_per_rank:,.1f} tokens per rank on average: seq_len {plan.seq_len:,} is not divisible by "
            f"sp {d.sp}, so shards are uneven by design (no padding)"
        )
    if plan.adaptive is None:
        lines.append(f"tokens    {plan.seq_len:,} per micro-batch stream (data.seq_len); {per_rank}")
        lines.append(
            f"batch     {plan.tokens_per_step:,} tokens per step = {plan.streams_per_step} streams over dp {d.dp}: "
            f"{plan.micro_batches_per_rank} micro-batches per rank per step"
        )
    m = cfg.model
    tied = "tied" if m.tie_embeddings else "untied"
    lines.append(
        f"model     {_count(plan.num_params)} params ({plan.num_params:,}): {m.n_layers} layers, dim {m.dim}, "
        f"heads {m.n_heads} / kv {m.n_kv_heads}, ffn {m.ffn_dim}, vocab {plan.vocab_size:,} ({plan.vocab_source}), "
        f"{tied} embeddings"
    )
    lines.append(
        f"flops     {_si(plan.flops_per_token, 'FLOP')} per token (training, causal, one document of seq_len: an upper "
        f"bound for packed shorter documents); {_si(plan.flops_per_step, 'FLOP')} per step"
    )
    how = f"FSDP-sharded over dp x sp = {plan.state_shards}" if cfg.parallel.fsdp else "replicated (parallel.fsdp=false)"
    lines.append(f"memory    per rank, {how}:")
    for label, value in (
        ("parameters (fp32 master)", plan.param_bytes),
        ("gradients (fp32)", plan.grad_bytes),
        ("AdamW state (2 x fp32)", plan.optim_bytes),
        ("total", plan.state_bytes),
    ):
        lines.append(f"          {label:<26} {_fmt_bytes(value)}")
    if plan.bf16_copy_bytes is not None:
        where = "FSDP: ~2 gathered blocks + embeddings/head" if cfg.parallel.fsdp else "whole model, autocast cache"
        when = "CUDA runs" if cfg.train.dtype == "auto" else "train.dtype=bf16"
        lines.append(f"          {'bf16 compute copies':<26} {_fmt_bytes(plan.bf16_copy_bytes)}  ({when}; {where}; not in total)")
    lines.extend(_memory_table(plan, cfg))
    prof = plan.profile
    if prof is None:
        lines.append("profile   cluster.profile=auto: detected on the devices at launch")
    else:
        peak = peak_flops(prof, "bf16" if cfg.train.dtype != "fp32" else "fp32")
        mem = "unknown" if prof.device_memory_gib is None else f"{prof.device_memory_gib:g} GiB"
        desc = f"profile   {prof.name}: device memory {mem}"
        if peak is None:
            desc += "; peak FLOP/s unknown, so MFU will print n/a"
        else:
            ideal = plan.flops_per_step / (peak * d.world_size)
            desc += f"; step time at 100% MFU {ideal:.2f} s"
        lines.append(desc)
        if prof.device_memory_gib is not None and plan.state_bytes / _GIB > prof.device_memory_gib:
            lines.append(f"WARNING   model state alone ({plan.state_bytes / _GIB:.1f} GiB) exceeds device memory; set parallel.fsdp=true or use more ranks")
    return "\n".join(lines)


def _memory_table(plan: DryRunPlan, cfg: Config) -> list[str]:
    """Per-policy peak estimate with its breakdown, whether it fits, and the longest shard that does."""
    lay = plan.memory_layout
    if lay is None:
        return []
    sp = {"local": "no SP", "ring": f"ring {lay.ring}", "ulysses": f"Ulysses {lay.ulysses}",
          "hybrid": f"Ulysses {lay.ulysses} x ring {lay.ring}"}[lay.algorithm]
    fits_to = "" if plan.usable_bytes is None else f"; fits: peak <= {USABLE_FRACTION:.0%} of {plan.profile.device_memory_gib:g} GiB"
    lines = [f"estimate  per rank, {plan.memory_tokens:,} tokens per micro-batch, {lay.precision}, {sp}, "
             f"{lay.attention} attention, loss chunks of {lay.loss_chunk_tokens:,} (seqpar.memory.estimate){fits_to}:",
             f"          {'memory.policy':<16}{'states':>10}{'saved act.':>12}{'head+loss':>11}{'recompute':>11}"
             f"{'workspace':>11}{'peak':>11}  fits  {'host':>10}  longest shard"]
    for policy, est in plan.estimates.items():
        mark = "*" if policy == cfg.memory.policy else " "
        fits = "  -  " if plan.usable_bytes is None else (" yes " if est.peak_bytes <= plan.usable_bytes else " NO  ")
        longest = f"{plan.longest[policy]:,} tokens" if plan.longest else "-"
        lines.append(f"          {mark}{policy:<15}{_gib(est.states)}{_gib(est.activations, 12)}{_gib(est.head_and_loss, 11)}"
                     f"{_gib(est.recompute, 11)}{_gib(max(est.workspace, est.attention_workspace), 11)}"
                     f"{_gib(est.peak_bytes, 11)}  {fits} {_gib(est.host)}  {longest}")
    lines.append("          (* memory.policy of this run; states include bf16 compute copies; the peak is the larger of "
                 f"the forward's end and the backward's start; host: offloaded activations per rank, "
                 f"memory.keep_last={lay.keep_last} blocks stay, memory.depth={lay.depth} in flight)")
    lines.append(f"          {plan.memo_alpha}")
    return lines


def _gib(x: float, width: int = 10) -> str:
    return f"{x / _GIB:>{width - 4}.1f} GiB"


def dry_run_report(cfg: Config, world_size: int) -> str:
    """Validate ``cfg`` for ``world_size`` ranks and return the multi-line report (pure).

    Raises ParallelDimsError / ConfigError (one line each) for layouts the trainer would refuse.
    """
    return format_report(plan_dry_run(cfg, world_size), cfg)
