"""Seeded parameter init whose values do not depend on the layout (world size, sharding, device).

Each parameter's full (logical) value is a pure function of ``(seed, name, shape)`` and its
:class:`InitRule`: the rows are cut into fixed blocks (about :data:`BLOCK_ELEMENTS` elements,
a function of the shape only), and block ``b`` is drawn from its own CPU ``torch.Generator``
seeded by a stable hash of ``(seed, name, b)``. A rank generates only the blocks that overlap
the rows it holds and copies those rows out, so it never holds more than its shard plus about
two blocks per parameter: no full parameter, no full model, no broadcast. The same function
serves FSDP2 shards (DTensor, ``Shard(0)`` / ``Replicate`` over any mesh), replicated models and
a single process, which is what makes them agree bitwise::

    with torch.device("meta"):
        model = Transformer(cfg, attention)
    fully_shard(...)                      # optional
    model.to_empty(device=device)
    init_parameters(model, seed, model.init_rule)

Values are drawn in fp32 on the CPU and cast to each parameter's dtype and device. They are
bitwise reproducible across processes and machines running the same torch build; the CPU normal
sampler has a vectorised path, so CPUs without AVX2 could differ in the last bit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

# Rows per block = max(1, BLOCK_ELEMENTS // elements per row). Part of the scheme: changing it
# changes every value drawn (tests lower it to exercise many blocks on small models).
BLOCK_ELEMENTS = 1 << 20

# Prefixes that wrappers insert into parameter names (activation checkpointing, torch.compile,
# FSDP1); stripped so that applying a policy does not change the values drawn (the same rule as
# torch.distributed.checkpoint's FQNs).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class InitRule:
    """How to fill one parameter: ``normal`` (mean 0, ``std``), ``ones`` or ``zeros``."""

    kind: Literal["normal", "ones", "zeros"]
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("normal", "ones", "zeros"):
            raise ValueError(f"InitRule.kind={self.kind!r} must be one of normal, ones, zeros")
        if self.kind == "normal" and not (self.std > 0 and math.isfinite(self.std)):
            raise ValueError(f"InitRule(normal) needs a positive finite std, got {self.std}")

    @staticmethod
    def normal(std: float) -> InitRule:
        return InitRule("normal", std)

    @staticmethod
    def ones() -> InitRule:
        return InitRule("ones")

    @staticmethod
    def zeros() -> InitRule:
        return InitRule("zeros")


@dataclass
class InitStats:
    """What :func:`init_parameters` drew in this process since :func:`reset_init_stats` (for tests
    and memory checks). ``generated``: fp32 elements drawn; ``largest_block``: largest single draw;
    ``per_param``: name -> (elements drawn, local elements, elements per block)."""

    generated: int = 0
    largest_block: int = 0
    per_param: dict[str, tuple[int, int, int]] = field(default_factory=dict)


_STATS = InitStats()


def init_stats() -> InitStats:
    return InitStats(_STATS.generated, _STATS.largest_block, dict(_STATS.per_param))


def reset_init_stats() -> None:
    global _STATS
    _STATS = InitStats()


def canonical_name(name: str) -> str:
    """``name`` without the prefixes that wrappers insert (``_checkpoint_wrapped_module.``, ...)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def block_seed(seed: int, name: str, block: int) -> int:
    """Stable 63-bit generator seed for block ``block`` of parameter ``name`` (not Python's salted hash)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rows_per_block(shape: tuple[int, ...], block_elements: int | None = None) -> int:
    """Rows of ``shape`` (dim 0; a 0-d shape has one row) per generator block."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, (block_elements or BLOCK_ELEMENTS) // max(row, 1))


def local_rows(p: torch.Tensor) -> tuple[int, int]:
    """The half-open range of dim-0 rows of the full parameter that this rank holds.

    Plain tensors hold all rows. A DTensor may be ``Replicate`` or ``Shard(0)`` on each mesh
    axis; ``Shard(0)`` follows ``torch.chunk`` (chunks of ceil(rows / n), so the last ranks may
    hold fewer or no rows), nested in mesh-axis order as DTensor defines it. Checked against
    ``p.to_local().shape``.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        return 0, (p.shape[0] if p.ndim else 1)
    shape = tuple(p.shape)
    lo, hi = 0, (shape[0] if shape else 1)
    coord = p.device_mesh.get_coordinate()
    if coord is None:
        raise ValueError("this rank is not in the parameter's device mesh; it has nothing to initialise")
    for axis, placement in enumerate(p.placements):
        if type(placement) is Shard and placement.dim == 0:
            n = p.device_mesh.size(axis)
            chunk = -(-(hi - lo) // n)
            lo, hi = min(lo + coord[axis] * chunk, hi), min(lo + (coord[axis] + 1) * chunk, hi)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"init_parameters supports Shard(0) and Replicate placements, got {placement} on mesh axis "
                f"{axis}; shard along dim 0 (FSDP2's default) or initialise before applying this sharding"
            )
    expected = (hi - lo, *shape[1:]) if shape else ()
    local = p.to_local()
    if tuple(local.shape) != expected:
        raise AssertionError(
            f"computed local shape {expected} (rows {lo}:{hi} of {shape}) but the DTensor holds "
            f"{tuple(local.shape)} with placements {p.placements}"
        )
    return lo, hi


@torch.no_grad()
def init_parameters(
    model: nn.Module,
    seed: int,
    rule: Callable[[str, tuple[int, ...]], InitRule],
    *,
    block_elements: int | None = None,
) -> None:
    """Fill every parameter of ``model`` in place with values that depend only on
    ``(seed, name, shape)``: ``rule(name, shape)`` picks the distribution.

    model: plain parameters, or DTensors as FSDP2 leaves them (``Shard(0)`` / ``Replicate``), on
    any device and dtype, already allocated (``to_empty``; meta parameters are an error). Names
    are ``named_parameters()`` names with wrapper prefixes removed (:func:`canonical_name`); a tied
    parameter is filled once, under its first name. block_elements: defaults to
    :data:`BLOCK_ELEMENTS`; part of the value definition. Not collective: no communication.
    """
    from torch.distributed.tensor import DTensor

    block_elements = block_elements or BLOCK_ELEMENTS
    for raw_name, p in model.named_parameters():
        name = canonical_name(raw_name)
        if p.is_meta:
            raise ValueError(f"parameter {name} is on the meta device: call model.to_empty(device=...) first")
        shape = tuple(p.shape)
        r = rule(name, shape)
        local = p.to_local() if isinstance(p, DTensor) else p
        lo, hi = local_rows(p)
        if local.numel() == 0:
            continue
        if r.kind != "normal":
            local.fill_(1.0 if r.kind == "ones" else 0.0)
            continue
        rows = local.view(1, *local.shape) if not shape else local  # 0-d: one row
        rpb = rows_per_block(shape, block_elements)
        row_shape = shape[1:]
        n_rows = shape[0] if shape else 1
        drawn = 0
        for b in range(lo // rpb, (hi - 1) // rpb + 1):
            b_lo, b_hi = b * rpb, min((b + 1) * rpb, n_rows)
            g = torch.Generator(device="cpu")
            g.manual_seed(block_seed(seed, name, b))
            block = torch.empty((b_hi - b_lo, *row_shape), dtype=torch.float32)
            block.normal_(mean=0.0, std=r.std, generator=g)
            s, e = max(lo, b_lo), min(hi, b_hi)
            rows[s - lo : e - lo].copy_(block[s - b_lo : e - b_lo])
            drawn += block.numel()
            _STATS.largest_block = max(_STATS.largest_block, block.numel())
            del block
        _STATS.generated += drawn
        _STATS.per_param[name] = (drawn, local.numel(), rpb * (math.prod(row_shape) if row_shape else 1))
