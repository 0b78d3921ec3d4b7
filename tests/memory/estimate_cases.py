"""Bytes autograd saves (saved-tensor hooks, one count per storage, parameters excluded), which
the estimator's per-token terms are checked against (peaks: seqpar.bench.memory_bench)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.bench.memory_bench import microbatch
from seqpar.config import ModelConfig


_MESH = []


def _fsdp_mesh():
    """One 1-D mesh over the pool's ranks per worker (creating a mesh creates process groups)."""
    if not _MESH:
        from torch.distributed.device_mesh import init_device_mesh

        _MESH.append(init_device_mesh("cpu", (dist.get_world_size(),)))
    return _MESH[0]


def saved_bytes(cfg: ModelConfig, tokens: int, autocast: bool = False, assignment=None, fsdp_bf16: bool = False) -> int:
    """Bytes saved for backward by one forward (with the chunked loss) on this rank; ``fsdp_bf16``:
    FSDP over the pool with bf16 gathered parameters, as the trainer runs on CUDA."""
    from seqpar.attention import build_attention
    from seqpar.model.llama import Transformer
    from seqpar.train.batch import shard_microbatch
    from seqpar.train.build import build_model

    torch.manual_seed(0)
    attention = build_attention("reference", torch.device("cpu"))
    if fsdp_bf16:
        model = build_model(cfg, attention, torch.device("cpu"), seed=0, fsdp_mesh=_fsdp_mesh(), param_dtype=torch.bfloat16)
    else:
        model = Transformer(cfg, attention)
    model.loss_chunk_tokens = 64
    mb = microbatch(tokens, cfg.vocab_size, torch.device("cpu"))
    if assignment is not None:
        mb = shard_microbatch(mb, assignment)
    # Storages are told apart by their StorageImpl, not their address: FSDP frees a block's gathered
    # parameters by resizing their storage to 0, so a later activation can reuse the address.
    params = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(mb.tokens, mb.ctx, labels=mb.labels)
    loss.backward()  # keeps every rank's collectives matched
    return sum(seen.values())


def saved_per_token_per_layer(cfg: ModelConfig, tokens: tuple[int, int], local: tuple[int, int],
                              autocast: bool = False, assignment=None, fsdp_bf16: bool = False) -> float:
    """d(saved bytes)/d(layers)/d(local tokens): differences over 1 vs 3 layers and two lengths cancel
    the head, the embedding and everything whose size does not grow with tokens (weight casts)."""
    import dataclasses

    def per_layer(t: int) -> float:
        one, three = (saved_bytes(dataclasses.replace(cfg, n_layers=n), t, autocast, assignment, fsdp_bf16)
                      for n in (1, 3))
        return (three - one) / 2

    return (per_layer(tokens[1]) - per_layer(tokens[0])) / (local[1] - local[0])


def sp_saved_per_token(cfg: ModelConfig, shapes: list[tuple[str, int, int]], tokens: tuple[int, int],
                       fsdp_bf16: bool = False) -> dict:
    """Inside a pool worker: saved bytes per local token per layer for each (algorithm, ulysses, ring)."""
    from seqpar.train.batch import SPAssignment
    from tests.support.dist import sp_groups

    world = dist.get_world_size()
    out = {}
    for algorithm, u, r in shapes:
        layout = "contiguous" if algorithm == "ulysses" else "zigzag"
        assignment = SPAssignment(algorithm, layout, sp_groups(u, r).sp_group)
        local = (tokens[0] // world, tokens[1] // world)
        out[algorithm] = saved_per_token_per_layer(cfg, tokens, local, assignment=assignment, fsdp_bf16=fsdp_bf16)
    return out


def offloaded_per_token_per_layer(cfg: ModelConfig, policy: str, alpha: float, tokens: tuple[int, int]) -> float:
    """Bytes the transfer engine receives per token and block under ``policy`` (offload | memo) with
    every block offloaded (keep_last 0): differences over 1 vs 3 layers and two lengths, as above."""
    import dataclasses

    from seqpar.attention import build_attention
    from seqpar.memory.checkpoint import apply_memory_policy
    from seqpar.memory.transfer import HostEngine
    from seqpar.model.llama import Transformer

    def moved(layers: int, t: int) -> int:
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(cfg, n_layers=layers), build_attention("reference", torch.device("cpu")))
        model.loss_chunk_tokens = 64
        engine = HostEngine(1)
        apply_memory_policy(model.layers, policy, engine=engine, keep_last=0, alpha=alpha)
        mb = microbatch(t, cfg.vocab_size, torch.device("cpu"))
        model(mb.tokens, mb.ctx, labels=mb.labels).backward()
        return engine.stats.offloaded_bytes

    per_layer = [(moved(3, t) - moved(1, t)) / 2 for t in tokens]
    return (per_layer[1] - per_layer[0]) / (tokens[1] - tokens[0])
