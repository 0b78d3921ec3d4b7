"""Model builder: meta device -> policies -> FSDP -> allocate local shards -> seeded init.

torchtitan's order, so no rank ever holds the full model and nothing is broadcast:

    mesh = init_device_mesh("cpu", (world,))                       # collective (caller's)
    model = build_model(cfg.model, attention, device, cfg.run.seed, fsdp_mesh=mesh,
                        policies=[apply_ac])                       # no communication
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from seqpar.attention.context import AttentionFn
from seqpar.config import ModelConfig
from seqpar.model.init import init_parameters
from seqpar.model.llama import Transformer


def build_model(
    model_cfg: ModelConfig,
    attention: AttentionFn,
    device: torch.device,
    seed: int,
    fsdp_mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
    policies: Sequence[Callable[[Transformer], None]] = (),
    init_from: str = "",
) -> Transformer:
    """The model on this rank, with fp32 parameters initialised from ``seed``.

    Built on the meta device; ``policies`` (e.g. activation checkpointing) are applied to the meta
    model in order; with ``fsdp_mesh`` (1-D mesh of all dp x sp ranks) each block and then the
    root are sharded with ``apply_fsdp`` (``param_dtype``: compute dtype of the gathered
    parameters, None keeps fp32; ignored without FSDP, where the trainer autocasts). Then only the local storage is allocated on
    ``device`` (a rank's ``Shard(0)`` rows of each parameter, ``torch.chunk`` split, so about
    1/world of the model; all of it without FSDP) and filled by
    :func:`seqpar.model.init.init_parameters` (or, with ``init_from``, read from a Hugging Face
    checkpoint, again only this rank's rows): the full value of every parameter is a function of
    (seed, name, shape) only, so sharded, replicated and single-process models are bitwise equal
    and replicas agree without a broadcast.

    Not collective: neither ``fully_shard`` at construction nor the init communicates, so ranks
    need not call this in step (creating ``fsdp_mesh`` is collective and is the caller's). The
    first forward is collective (FSDP all-gathers the parameters).
    """
    with torch.device("meta"):
        model = Transformer(model_cfg, attention)
    for policy in policies:
        policy(model)
    if fsdp_mesh is not None:
        from seqpar.parallel.fsdp import apply_fsdp

        apply_fsdp(model, list(model.layers), fsdp_mesh, param_dtype=param_dtype)
    ties = _tied(model)
    model.to_empty(device=device)
    for owners in ties:  # to_empty gives each (module, name) its own new Parameter: tie them again
        primary = getattr(owners[0][0], owners[0][1])
        for module, attr in owners[1:]:
            setattr(module, attr, primary)
    if any(True for _ in model.buffers()):
        names = [n for n, _ in model.named_buffers()]
        raise NotImplementedError(f"build_model leaves buffers uninitialised after to_empty: {names}; initialise them here")
    if init_from:  # a Hugging Face checkpoint: each rank reads its own rows (seqpar.model.hf.load_rows)
        from seqpar.model.hf import load_rows

        load_rows(model, init_from)
    else:
        init_parameters(model, seed, model.init_rule)
    return model


def _tied(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Every parameter registered under more than one (module, attribute), in module order (the
    first owner is the one FSDP manages)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, attr))
    return [o for o in owners.values() if len(o) > 1]
