"""Worker-side code: per-rank saved activation bytes of the model under SP (saved-tensor hooks)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from tests.support.dist import sp_groups


def saved_activation_bytes(algorithm: str, ulysses: int, ring: int, seqlens: list[int]) -> int:
    """Bytes of tensors autograd saves in one forward of a tiny model on this rank's shard.

    Parameters are excluded (they are model state, not activations); each storage counts once.
    """
    from seqpar.attention import build_attention
    from seqpar.config import ModelConfig
    from seqpar.model.llama import Transformer
    from seqpar.train.batch import SPAssignment, make_microbatch, shard_microbatch

    world = dist.get_world_size()
    groups = sp_groups(ulysses, ring)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=256)
    model = Transformer(cfg, build_attention("reference", torch.device("cpu")))
    tokens = np.random.default_rng(0).integers(0, 256, sum(seqlens))
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    mb = make_microbatch(tokens, cu, torch.device("cpu"))
    if world > 1:
        layout = "contiguous" if algorithm == "ulysses" else "zigzag"
        mb = shard_microbatch(mb, SPAssignment(algorithm, layout, groups.sp_group))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(mb.tokens, mb.ctx)
    logits.sum().backward()  # keep every rank's collectives matched
    return sum(seen.values())
