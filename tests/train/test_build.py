"""build_model: sharded (FSDP2) and replicated builds equal the single-process init bitwise at
world 1, 2 and 4, and no rank ever allocates the full model.

"Never materialises the full model" is checked two ways on every rank: a dispatch mode records
every tensor storage the build allocates (to_empty's local shards, FSDP's padded copies, the init's
blocks), and seqpar.model.init counts the elements it draws. ``test_checker_catches_a_full_build``
runs the same checks on the old build (full fp32 model on every rank, broadcast, then FSDP) and
requires them to fail, so the budget cannot silently become vacuous.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from seqpar.config import ModelConfig

BLOCK = 256  # elements per init block in these tests: many blocks per parameter on tiny models
CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=250)  # 250 rows: uneven at world 4
SEED = 7


def _attn(q, k, v, ctx):
    return q  # shape-correct stand-in; build_model never calls it


class AllocTracker(TorchDispatchMode):
    """Bytes of every new (non-meta) storage produced by an op; for a DTensor, its local tensor's."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        out = func(*args, **kwargs)

        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        seen = {
            local(t).untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and not local(t).is_meta
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or local(t).is_meta:
                continue
            storage = local(t).untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue  # a view or an in-place result, not an allocation
            seen.add(storage.data_ptr())
            self.total += storage.nbytes()
            self.largest = max(self.largest, storage.nbytes())
        return out


def _summary(model: nn.Module, tracker: AllocTracker, world: int) -> dict:
    """What a rank allocated and drew during a build, beside what it holds and what the full model is."""
    from seqpar.model.init import init_stats, rows_per_block

    locals_ = {n: (p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()}
    blocks = {n: rows_per_block(tuple(p.shape), BLOCK) * math.prod(p.shape[1:]) for n, p in model.named_parameters()}
    stats = init_stats()
    return dict(
        world=world,
        alloc_total=tracker.total,
        alloc_largest=tracker.largest,
        local_bytes=sum(t.numel() * t.element_size() for t in locals_.values()),
        full_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        # torch.chunk rows of the largest parameter: FSDP pads a short shard up to this
        largest_shard_bytes=max(4 * -(-p.shape[0] // world) * math.prod(p.shape[1:]) for p in model.parameters()),
        largest_block_bytes=4 * max(blocks.values()),
        drawn={n: stats.per_param.get(n, (0, 0, 0))[0] for n in locals_},
        local_numel={n: t.numel() for n, t in locals_.items()},
        block_numel=blocks,
    )


def violations(s: dict) -> list[str]:
    """Reasons a rank's build held more than its shard plus a few blocks (empty: within budget)."""
    out = []
    # No single allocation larger than the largest (padded) shard or one init block.
    cap = max(s["largest_shard_bytes"], s["largest_block_bytes"])
    if s["alloc_largest"] > cap:
        out.append(f"allocated one tensor of {s['alloc_largest']} B > max(padded shard, block) = {cap} B")
    # In all: to_empty's shards, FSDP's padded copies of uneven shards, and the drawn blocks
    # (each at most the shard plus two blocks) stay within 3x the shard plus two blocks per parameter.
    budget = 3 * s["local_bytes"] + 2 * 4 * sum(s["block_numel"].values())
    if s["alloc_total"] > budget:
        out.append(f"allocated {s['alloc_total']} B in all > 3 x shard + 2 blocks/param = {budget} B")
    if s["world"] >= 4 and s["alloc_total"] >= s["full_bytes"]:
        out.append(f"allocated {s['alloc_total']} B in all >= the full model's {s['full_bytes']} B")
    for name, drawn in s["drawn"].items():
        if drawn > s["local_numel"][name] + 2 * s["block_numel"][name]:
            out.append(f"{name}: drew {drawn} elements > local {s['local_numel'][name]} + 2 blocks")
    return out


def _reference(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The single-process model: plain construction after torch.manual_seed."""
    from seqpar.model.llama import Transformer

    torch.manual_seed(SEED)
    return {n: p.detach().clone() for n, p in Transformer(cfg, _attn).named_parameters()}


def _mismatches(model: nn.Module, ref: dict[str, torch.Tensor]) -> list[str]:
    from torch.distributed.tensor import DTensor

    got = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()}
    bad = sorted(set(got) ^ set(ref))
    return bad + [n for n in got if n in ref and not torch.equal(got[n], ref[n])]


class _Odd(nn.Module):
    """Rows that do not divide by the world, fewer rows than ranks, a 3-D and a 1-D parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.vocab = nn.Parameter(torch.empty(250, 8))
        self.few = nn.Parameter(torch.empty(3, 5))
        self.one = nn.Parameter(torch.empty(1, 6))
        self.cube = nn.Parameter(torch.empty(7, 2, 3))
        self.bias = nn.Parameter(torch.empty(5))


def _odd_rule(name, shape):
    from seqpar.model.init import InitRule

    return InitRule.ones() if len(shape) == 1 else InitRule.normal(0.5)


def _odd_reference() -> dict[str, torch.Tensor]:
    from seqpar.model.init import init_parameters

    m = _Odd()
    init_parameters(m, SEED, _odd_rule)
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _odd_sharded(mesh) -> list[str]:
    from torch.distributed.fsdp import fully_shard

    from seqpar.model.init import init_parameters

    with torch.device("meta"):
        m = _Odd()
    fully_shard(m, mesh=mesh)
    m.to_empty(device="cpu")
    init_parameters(m, SEED, _odd_rule)
    return _mismatches(m, _odd_reference())


def _world_cases() -> dict:
    """On every rank: FSDP and replicated builds of tied and untied models, odd shapes, HSDP and
    Replicate DTensors; returns mismatching names and this rank's memory summaries."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from seqpar.attention import build_attention
    from seqpar.model import init as init_mod
    from seqpar.model.init import init_parameters
    from seqpar.model.llama import Transformer
    from seqpar.train.batch import make_microbatch
    from seqpar.train.build import build_model

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    bad: dict[str, list[str]] = {}
    summaries = []
    saved, init_mod.BLOCK_ELEMENTS = init_mod.BLOCK_ELEMENTS, BLOCK
    try:
        for tie in (True, False):
            cfg = ModelConfig(**CFG, tie_embeddings=tie)
            ref = _reference(cfg)
            init_mod.reset_init_stats()
            with AllocTracker() as tracker:
                model = build_model(cfg, _attn, torch.device("cpu"), SEED, fsdp_mesh=mesh)
            summaries.append(_summary(model, tracker, world))
            bad[f"fsdp tie={tie}"] = _mismatches(model, ref)
            assert (model.output.weight is model.tok_embeddings.weight) == tie
            for name, p in model.named_parameters():
                assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
                rows = -(-p.shape[0] // world)  # torch.chunk: ceil(rows / world) per rank, the rest short
                expected = max(0, min(rows, p.shape[0] - dist.get_rank() * rows)) * math.prod(p.shape[1:])
                assert p.to_local().numel() == expected, (name, p.to_local().shape)
            replicated = build_model(cfg, _attn, torch.device("cpu"), SEED)
            assert (replicated.output.weight is replicated.tok_embeddings.weight) == tie
            bad[f"replicated tie={tie}"] = _mismatches(replicated, ref)
            if tie:
                # FSDP gathers what the init wrote: same logits as the single-process model.
                tokens, cu = np.arange(40) % cfg.vocab_size, np.array([0, 15, 40], dtype=np.int32)
                torch.manual_seed(SEED)
                plain = Transformer(cfg, build_attention("reference", torch.device("cpu")))
                mb = make_microbatch(tokens, cu, torch.device("cpu"))
                for block in model.layers:
                    block.attention.attention = plain.layers[0].attention.attention
                with torch.no_grad():
                    if not torch.equal(model(mb.tokens, mb.ctx), plain(mb.tokens, mb.ctx)):
                        bad["fsdp forward"] = ["logits differ from the single-process model"]
        bad["odd shapes, fsdp"] = _odd_sharded(mesh)
        if world == 4:
            hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            bad["odd shapes, hsdp (Replicate, Shard(0))"] = _odd_sharded(hsdp)
        rep = nn.Module()
        rep.w = nn.Parameter(distribute_tensor(torch.empty(10, 3), mesh, [Replicate()]))
        init_parameters(rep, SEED, _odd_rule)
        m = nn.Module()
        m.w = nn.Parameter(torch.empty(10, 3))
        init_parameters(m, SEED, _odd_rule)
        bad["replicate dtensor"] = [] if torch.equal(rep.w.to_local(), m.w) else ["w"]
    finally:
        init_mod.BLOCK_ELEMENTS = saved
    return dict(bad={k: v for k, v in bad.items() if v}, summaries=summaries)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_build_matches_single_process_and_stays_sharded(dist_pool, world):
    results = dist_pool(world).run(_world_cases)
    for rank, r in enumerate(results):
        assert r["bad"] == {}, f"rank {rank}: {r['bad']}"
        for s in r["summaries"]:
            assert violations(s) == [], f"rank {rank}: {violations(s)}"
            assert s["alloc_total"] >= s["local_bytes"]  # the tracker sees the build's allocations
            if world == 4:
                assert sum(s["drawn"].values()) < 0.35 * s["full_bytes"] / 4


def _old_build() -> dict:
    """The build before this change (trainer.build_model at 3cad8e4): the full fp32 model on every
    rank, a broadcast of every parameter, then FSDP."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seqpar.model import init as init_mod
    from seqpar.model.llama import Transformer
    from seqpar.parallel.fsdp import apply_fsdp

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    saved, init_mod.BLOCK_ELEMENTS = init_mod.BLOCK_ELEMENTS, BLOCK
    try:
        init_mod.reset_init_stats()
        with AllocTracker() as tracker:
            torch.manual_seed(SEED)
            model = Transformer(ModelConfig(**CFG), _attn)
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
            apply_fsdp(model, list(model.layers), mesh)
        return _summary(model, tracker, dist.get_world_size())
    finally:
        init_mod.BLOCK_ELEMENTS = saved


def test_checker_catches_a_full_build(dist_pool):
    for s in dist_pool(4).run(_old_build):
        found = violations(s)
        assert any("one tensor" in v for v in found) and any("in all" in v for v in found), found
        assert any("drew" in v for v in found), found


def _only_rank0_builds() -> bool:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seqpar.train.build import build_model

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # collective: every rank
    if dist.get_rank() == 0:  # a collective inside build_model would wait for rank 1 forever
        build_model(ModelConfig(**CFG), _attn, torch.device("cpu"), SEED, fsdp_mesh=mesh)
    dist.barrier()
    return True


def test_build_is_not_collective(dist_pool):
    assert dist_pool(2).run(_only_rank0_builds, timeout_s=120) == [True, True]


def test_build_without_fsdp_matches_plain_construction():
    from seqpar.train.build import build_model

    for tie in (True, False):
        cfg = ModelConfig(**CFG, tie_embeddings=tie)
        model = build_model(cfg, _attn, torch.device("cpu"), SEED)
        assert (model.output.weight is model.tok_embeddings.weight) == tie
        assert _mismatches(model, _reference(cfg)) == []
    other = build_model(ModelConfig(**CFG), _attn, torch.device("cpu"), SEED + 1)
    assert not torch.equal(other.tok_embeddings.weight, model.tok_embeddings.weight)
    calls = []
    policies = [lambda m: calls.append(all(p.is_meta for p in m.parameters())), lambda m: calls.append(2)]
    build_model(ModelConfig(**CFG), _attn, torch.device("cpu"), SEED, policies=policies)
    assert calls == [True, 2]  # policies see the meta model, in order
    # Without FSDP, param_dtype is ignored: parameters stay fp32 (the trainer autocasts).
    model = build_model(ModelConfig(**CFG), _attn, torch.device("cpu"), SEED, param_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
