"""The training run's cost model: profile, per-rank capacity K and allowed algorithms (adaptive runs).

    cm, notes = run_cost_model(cfg, world=4, device=torch.device("cpu"), local_world=4)

``capacity_tokens`` is the one place the planner's K comes from: today the profile's activation
bytes per token scaled to the model (``build_cost_model``); the memory estimator replaces it.
The profile is ``scatter.profile``: ``auto`` takes this device's fitted profile if ``seqpar
profile`` wrote one (``fitted_profile_path``), else the shipped hardware profile of the device.
"""

from __future__ import annotations

import dataclasses
import os

from seqpar.config import Config, ConfigError
from seqpar.hardware import HardwareProfile, detect_profile_name, load_profile
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


def capacity_tokens(cm: CostModel) -> int:
    """K, tokens per rank whose activations fit beside the model states (the memory issue's
    estimator replaces this); from the profile's activation bytes per token scaled to the model."""
    return cm.capacity


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
    k = sc.capacity_tokens or capacity_tokens(cm)
    cm = dataclasses.replace(cm, capacity=k)
    max_tokens = cm.max_degree * k
    if cfg.data.seq_len > max_tokens:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than the pool can hold: {cm.max_degree} ranks x capacity "
            f"{k:,} tokens = {max_tokens:,}; lower data.seq_len, raise scatter.capacity_tokens, or add ranks"
        )
    notes = {"profile": profile.name, "source": profile.source, "capacity": k,
             "capacity_from": "scatter.capacity_tokens" if sc.capacity_tokens else "profile activation bytes"}
    return cm, notes


def degree_summary(cm: CostModel) -> str:
    """'degrees 1,2,4: ulysses at 2 (not 4: <head rule>), ring, hybrid at 4' for the start-up line."""
    from seqpar.parallel.dims import ulysses_head_error
    from seqpar.parallel.pool import powers_of_two

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
