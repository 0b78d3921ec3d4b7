"""The training run's cost model: profile, per-rank capacity K and allowed algorithms (adaptive runs).

    cm, notes = run_cost_model(cfg, world=4, device=torch.device("cpu"), local_world=4)

``capacity_tokens`` is the one place the planner's K comes from: the memory estimator's longest
shard per rank under ``memory.policy`` (``seqpar.memory.estimate``), unless
``scatter.capacity_tokens`` sets it.
The profile is ``scatter.profile``: ``auto`` takes this device's fitted profile if ``seqpar
profile`` wrote one (``fitted_profile_path``), else the shipped hardware profile of the device.
"""

from __future__ import annotations

import dataclasses
import os

from seqpar.config import Config, ConfigError, ModelConfig
from seqpar.hardware import HardwareProfile, detect_profile_name, load_profile
from seqpar.memory.estimate import MemoryLayout, attention_kind, estimate_memory, max_tokens, precision_of
from seqpar.parallel.pool import powers_of_two
from seqpar.scatter.costmodel import CostModel, CostModelError, build_cost_model


def fitted_profile_path(device_name: str) -> str:
    """Where ``seqpar profile`` writes (and ``scatter.profile: auto`` looks for) the fit of a device kind."""
    from seqpar.data.corpus import default_cache_dir

    return os.path.join(default_cache_dir(), "profiles", f"{device_name}-fitted.yaml")


def host_memory_gib() -> float:
    """Physical memory of this machine in GiB (the 'device' memory of CPU ranks)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def resolve_scatter_profile(spec: str, device) -> HardwareProfile:
    """``scatter.profile`` to a profile with the cost-model sections (ConfigError naming the key)."""
    name = detect_profile_name(device) if spec == "auto" else None
    try:
        if spec == "auto":
            fitted = fitted_profile_path(name or "unknown")
            if os.path.isfile(fitted):
                return load_profile(fitted)
            if name is None:
                raise ValueError("this device has no shipped profile")
            return load_profile(name)
        return load_profile(spec)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"scatter.profile={spec!r}: {e}; name a profile in cluster/profiles or a YAML path, "
                          "or fit one with `seqpar profile`") from None


def memory_layouts(cm: CostModel, precision: str, attention: str, loss_chunk_tokens: int, alpha: float = 1.0,
                   keep_last: int = 2) -> list[MemoryLayout]:
    """The per-rank layouts a pool group can take: degree 1, and each algorithm at the largest degree
    it runs (the all-to-all's replicated K/V and second output grow with the degree)."""
    kw = dict(state_shards=cm.world, precision=precision, attention=attention, loss_chunk_tokens=loss_chunk_tokens,
              alpha=alpha, keep_last=keep_last)
    layouts = [MemoryLayout("local", **kw)]
    for d in powers_of_two(cm.max_degree)[1:]:
        for a in cm.algorithms(d):
            u, r = cm.split(d, a)
            layouts.append(MemoryLayout(a, ulysses=u, ring=r, **kw))
    return layouts


def capacity_tokens(cm: CostModel, model: ModelConfig, policy: str, precision: str, attention: str = "flash",
                    loss_chunk_tokens: int = 4096, alpha: float = 1.0, keep_last: int = 2) -> CostModel:
    """``cm`` with K, the tokens per rank whose peak fits ``cm.memory_bytes`` under memory ``policy``,
    from the memory estimator (``seqpar.memory.estimate``): the smallest over the layouts a group can
    take, so any plan within K fits. Its memory terms (``memory_per_rank``) become the estimator's
    (states and the per-token slope of that layout's peak), and its compute terms include the
    policy's recomputation (memo: its ``alpha``; offload and memo keep the last ``keep_last`` blocks)."""
    layouts = memory_layouts(cm, precision, attention, loss_chunk_tokens, alpha, keep_last)
    fits = [(max_tokens(model, policy, lay, cm.memory_bytes), lay) for lay in layouts]
    k, lay = min(fits, key=lambda x: x[0])
    base = estimate_memory(model, policy, 0, lay).peak_bytes
    slope = (estimate_memory(model, policy, max(k, 1), lay).peak_bytes - base) / max(k, 1)
    notes = {**cm.notes, "memory_policy": policy, "capacity_layout": lay.algorithm}
    # Recomputation is paid in time: the forward is a third of forward + backward, so ``full`` (which
    # re-runs the whole block) costs 4/3 of the compute and ``selective`` 4/3 of the token-local part,
    # memo 1 + (1 - alpha) / 3 of it. Re-run communication under ``full`` is not priced (the ring's
    # overlaps attention); offload's copies are assumed hidden (MEMO's LP chooses alpha so they are).
    a1 = cm.a1 * (4 / 3 if policy == "full" else 1.0)
    a2 = cm.a2 * {"full": 4 / 3, "selective": 4 / 3, "memo": 1 + (1 - alpha) / 3}.get(policy, 1.0)
    return dataclasses.replace(cm, capacity=k, state_bytes_per_rank=base, act_bytes_per_token=slope, a1=a1, a2=a2,
                               notes=notes)


def memo_alpha(cfg: Config) -> float:
    """memo's alpha for planning: ``memory.alpha``, or under ``auto`` the value the trainer solved
    and wrote back into the config before planning (1 when nothing solved it yet)."""
    return 1.0 if cfg.memory.alpha == "auto" else float(cfg.memory.alpha)


def run_cost_model(cfg: Config, world: int, device, local_world: int = 1) -> tuple[CostModel, dict]:
    """The cost model the executor plans with, and notes for the start-up line.

    A profile without device memory (CPU) uses this machine's memory split over its local ranks.
    ``scatter.capacity_tokens`` overrides K; ``scatter.algorithms`` restricts the algorithms.
    """
    sc = cfg.scatter
    profile = resolve_scatter_profile(sc.profile, device)
    if profile.device_memory_gib is None:
        profile = dataclasses.replace(profile, device_memory_gib=host_memory_gib() / max(local_world, 1))
    try:
        cm = build_cost_model(profile, cfg.model, world)
        cm = dataclasses.replace(cm, allowed=cfg.scatter.algorithm_list)
    except CostModelError as e:
        raise ConfigError(f"scatter.profile={sc.profile!r}: {e}") from None
    if sc.capacity_tokens:
        cm = dataclasses.replace(cm, capacity=sc.capacity_tokens)
    else:
        try:
            cm = capacity_tokens(cm, _with_vocab(cfg.model, cfg.data.tokenizer), cfg.memory.policy,
                                 precision_of(cfg.train.dtype, cfg.parallel.fsdp, getattr(device, "type", str(device))),
                                 attention_kind(cfg.kernels.attention, getattr(device, "type", str(device))),
                                 cfg.memory.loss_chunk_tokens, memo_alpha(cfg), cfg.memory.keep_last)
        except CostModelError as e:
            raise ConfigError(f"memory.policy={cfg.memory.policy}: {e}") from None
    k = cm.capacity
    max_tokens = cm.max_degree * k
    if cfg.data.seq_len > max_tokens:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than the pool can hold: {cm.max_degree} ranks x capacity "
            f"{k:,} tokens = {max_tokens:,}; lower data.seq_len, raise scatter.capacity_tokens, or add ranks"
        )
    notes = {"profile": profile.name, "source": profile.source, "capacity": k,
             "capacity_from": "scatter.capacity_tokens" if sc.capacity_tokens
             else f"memory estimator, memory.policy={cfg.memory.policy}"}
    return cm, notes


def _with_vocab(model: ModelConfig, tokenizer: str) -> ModelConfig:
    """The model with its vocabulary size (0 in the config: the tokenizer's, rounded up to 64 as the
    trainer does): the LM head's memory depends on it."""
    if model.vocab_size > 0:
        return model
    from seqpar.data.tokenizer import padded_vocab_size

    return dataclasses.replace(model, vocab_size=padded_vocab_size(tokenizer))


def degree_summary(cm: CostModel) -> str:
    """'degrees 1,2,4: ulysses at 2 (not 4: <head rule>), ring, hybrid at 4' for the start-up line."""
    from seqpar.parallel.dims import ulysses_head_error
    degrees = powers_of_two(cm.max_degree)
    parts = []
    for a in cm.allowed:
        at = [d for d in degrees if d > 1 and a in cm.algorithms(d)]
        text = f"{a} at {','.join(map(str, at)) if at else 'no degree'}"
        if a == "ulysses":
            excluded = [d for d in degrees if d > 1 and not cm.ulysses_ok(d)]
            if excluded:
                why = ulysses_head_error(cm.n_heads, cm.n_kv_heads, excluded[0]) or ""
                text += f" (excluded at {','.join(map(str, excluded))}: {why.split(':')[0]})"
        parts.append(text)
    return f"degrees {','.join(map(str, degrees))}; " + "; ".join(parts)
