"""Cases run inside a gloo pool: megatron-core's GPTModel with seqpar's core attention at cp = world
against the same model at cp = 1 on the same packed batch (logits and every parameter gradient)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.distributed as dist

_GROUPS: dict = {}


def patch_megatron_for_cpu() -> None:
    """megatron-core's RoPE moves ``inv_freq`` to ``torch.cuda.current_device()`` on first use; on a
    CPU-only machine that device is the CPU (the one patch GPTModel needs there)."""
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _collection(cp_ranks: list[int], hcp: list | None = None):
    """Megatron's ProcessGroupCollection for tp = pp = 1 and the given CP ranks (groups made once)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    world, rank = dist.get_world_size(), dist.get_rank()
    key = ("self",)
    if key not in _GROUPS:  # collective: every rank creates every one-rank group in order
        _GROUPS[key] = [dist.new_group([r]) for r in range(world)]
    selfs = _GROUPS[key]
    ckey = ("cp", tuple(cp_ranks))
    if ckey not in _GROUPS:
        _GROUPS[ckey] = dist.new_group(cp_ranks) if len(cp_ranks) > 1 else selfs[rank]
    pgc = ProcessGroupCollection()
    one = selfs[rank]
    for name in ("tp", "pp", "embd", "pos_embd", "dp", "mp", "tp_dp_cp", "expt_tp", "ep", "expt_dp", "tp_ep",
                 "tp_ep_pp", "intra_dp_cp", "dp_cp"):
        setattr(pgc, name, one)
    pgc.cp = _GROUPS[ckey]
    pgc.tp_cp = _GROUPS[ckey]
    pgc.hcp = hcp or []
    return pgc


def build_model(cp: int, algorithm: str, pgc, seed: int = 7, heads: int = 4, kv: int = 2, core_attention: str = "seqpar"):
    """A 2-layer RMSNorm/SwiGLU/RoPE GPTModel on the local layer spec with seqpar's core attention
    (``core_attention="megatron"`` keeps the spec's own DotProductAttention)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel
        from megatron.core.transformer.transformer_config import TransformerConfig

        from seqpar.integrations.megatron import SeqparCoreAttention

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=heads, num_query_groups=kv, ffn_hidden_size=96,
        context_parallel_size=cp, use_cpu_initialization=True, params_dtype=torch.float32,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, masked_softmax_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, cp_comm_type="p2p",
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if core_attention == "seqpar":
        spec.submodules.self_attention.submodules.core_attention = functools.partial(SeqparCoreAttention,
                                                                                     algorithm=algorithm)
    torch.manual_seed(seed)
    return GPTModel(config, spec, vocab_size=128, max_sequence_length=256, position_embedding_type="rope",
                    pg_collection=pgc, share_embeddings_and_output_weights=False)


def _packed_batch(lengths: list[int], seed: int = 0):
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (int(cu[-1]),), generator=g), torch.randint(0, 128, (int(cu[-1]),), generator=g), cu


def _run(model, batch, n_tokens: int, group) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward of the summed token loss; returns the full batch's logits [n_tokens, vocab]
    (gathered over ``group``) and every parameter gradient summed over ``group`` (Megatron's DDP
    all-reduces gradients over dp x cp the same way)."""
    model.zero_grad(set_to_none=True)
    logits = model(batch.input_ids, batch.position_ids, None, packed_seq_params=batch.packed_seq_params)[0]
    per_token = torch.nn.functional.cross_entropy(logits, batch.labels[0], reduction="none")
    (per_token * batch.loss_mask[0]).sum().backward()
    world = dist.get_world_size(group)
    local = torch.cat([logits.detach(), batch.token_index[:, None].to(logits.dtype)], dim=1)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    both = torch.cat(parts)
    real = both[:, -1] >= 0
    full = torch.empty(n_tokens, logits.shape[1])
    full[both[real, -1].long()] = both[real, :-1]
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=group)
        grads[name] = g
    return full, grads


def _hierarchical(ulysses: int) -> list:
    """Megatron's hcp groups for ``hierarchical_context_parallel_sizes=[ulysses, world // ulysses]``:
    level 1 adjacent ranks (Ulysses), level 2 strided (ring), made as parallel_state makes them."""
    world, rank = dist.get_world_size(), dist.get_rank()
    key = ("hcp", ulysses)
    if key not in _GROUPS:
        ring = world // ulysses
        levels = [[list(range(j * ulysses, (j + 1) * ulysses)) for j in range(ring)],
                  [list(range(i, world, ulysses)) for i in range(ulysses)]]
        mine = []
        for level in levels:
            for ranks in level:
                g = dist.new_group(ranks)
                if rank in ranks:
                    mine.append(g)
        _GROUPS[key] = mine
    return _GROUPS[key]


def cp_parity(algorithm: str, lengths: list[int], heads: int = 4, kv: int = 2, ulysses: int = 2) -> dict[str, float]:
    """cp = world vs cp = 1 (both with seqpar's core attention): max |diff| of logits and gradients."""
    from seqpar.integrations.megatron import megatron_thd_shard

    patch_megatron_for_cpu()
    world, rank = dist.get_world_size(), dist.get_rank()
    tok, lab, cu = _packed_batch(lengths)
    one, many = _collection([rank]), _collection(list(range(world)), _hierarchical(ulysses) if algorithm == "hybrid" else None)
    ref_logits, ref_grads = _run(build_model(1, algorithm, one, heads=heads, kv=kv),
                                 megatron_thd_shard(tok, lab, cu, 1, 0, one.cp), int(cu[-1]), one.cp)
    logits, grads = _run(build_model(world, algorithm, many, heads=heads, kv=kv),
                         megatron_thd_shard(tok, lab, cu, world, rank, many.cp), int(cu[-1]), many.cp)
    scale = lambda t: float(t.abs().max()) or 1.0  # noqa: E731
    return {"logits": float((logits - ref_logits).abs().max()) / scale(ref_logits),
            "grads": max(float((grads[n] - ref_grads[n]).abs().max()) / scale(ref_grads[n]) for n in ref_grads),
            "n_grads": float(len(ref_grads)), "logit_scale": scale(ref_logits)}


def matches_megatron_attention() -> float:
    """cp = 1, sbhd (no packing): seqpar's core attention vs Megatron's own DotProductAttention
    in the same GPTModel: max |diff| of logits."""
    from megatron.core import parallel_state

    patch_megatron_for_cpu()
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:  # DotProductAttention's scratch buffer
        parallel_state._set_global_memory_buffer()
    # DotProductAttention forks the CUDA RNG around its (zero) dropout: a no-op fork on CPU.
    import contextlib
    import types

    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker = lambda: types.SimpleNamespace(fork=contextlib.nullcontext)
    one = _collection([dist.get_rank()])
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    pos = torch.arange(24)[None].expand(2, 24)
    ours = build_model(1, "ring", one)
    theirs = build_model(1, "ring", one, core_attention="megatron")
    mask = torch.ones(1, 1, 24, 24, dtype=torch.bool).triu(1)  # True = masked (Megatron's convention)
    a = ours(ids, pos, mask)
    b = theirs(ids, pos, mask)
    return float((a - b).abs().max())
