"""Activation offload through the host transfer engine: what moves (never a parameter, each storage
once), what stays on the device, the schedule's races, and a missing wait caught as NaN."""

import gc
import weakref

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from seqpar.attention import build_attention
from seqpar.config import ModelConfig
from seqpar.memory.checkpoint import apply_memory_policy
from seqpar.memory.transfer import HostEngine
from seqpar.model.llama import Transformer
from seqpar.train.batch import make_microbatch

CFG = dict(dim=32, n_heads=4, n_kv_heads=2, vocab_size=64)
T = 128


def _model(layers: int, policy: str = "none", engine=None, keep_last: int = 2) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=layers, **CFG), build_attention("reference", torch.device("cpu")))
    model.loss_chunk_tokens = 32
    apply_memory_policy(model.layers, policy, engine=engine, keep_last=keep_last)
    return model


def _mb(t: int = T):
    tokens = np.random.default_rng(0).integers(0, CFG["vocab_size"], t)
    return make_microbatch(tokens, np.array([0, 50, 91, t], dtype=np.int32), torch.device("cpu"))


def _grads(model) -> tuple[float, dict]:
    mb = _mb()
    loss = model(mb.tokens, mb.ctx, labels=mb.labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


class RecordingEngine(HostEngine):
    """The host engine, remembering every storage it was given."""

    def __init__(self, depth: int = 1) -> None:
        super().__init__(depth)
        self.given: list[tuple[int, int, int]] = []  # (layer, storage key, bytes)
        self.pins: list[StorageWeakRef] = []

    def offload(self, layer, data):
        self.given.append((layer, data.untyped_storage()._cdata, data.numel()))
        self.pins.append(StorageWeakRef(data.untyped_storage()))  # no address is reused during the test
        return super().offload(layer, data)


@pytest.mark.parametrize("depth", [1, 8])
def test_offload_matches_none_and_reloads_wait_for_their_offload(depth):
    """depth 8 > layers: no offload completes during the forward, so every prefetch must first wait
    for its layer's offload (Megatron once reloaded before the first iteration's offload finished)."""
    loss_ref, ref = _grads(_model(6))
    engine = HostEngine(depth)
    loss, got = _grads(_model(6, "offload", engine))
    assert loss == loss_ref
    for name, g in got.items():
        torch.testing.assert_close(g, ref[name], rtol=0, atol=0, msg=name)
    assert engine.stats.offloaded_bytes > 0 and engine.stats.late_reloads == 0
    assert engine.stats.host_bytes == 0 and engine.stats.device_bytes == 0  # all freed after the backward


@pytest.mark.parametrize("skip", ["_wait_reload", "_wait_offload"])
def test_a_missing_wait_gives_nan_not_a_race(monkeypatch, skip):
    """Buffers start as 0xFF bytes (NaN): a copy whose wait is skipped is never silently right."""
    engine = HostEngine(1)
    model = _model(6, "offload", engine)
    monkeypatch.setattr(engine, skip, lambda h: None)  # the event "completes" but the bytes never arrived
    _, grads = _grads(model)
    assert any(not torch.isfinite(g).all() for g in grads.values())
    _, clean = _grads(_model(6, "offload", HostEngine(1)))
    assert all(torch.isfinite(g).all() for g in clean.values())


def test_no_parameter_is_offloaded_and_each_storage_moves_once(monkeypatch):
    import seqpar.model.llama as llama

    tables = []

    def recorded(*args):
        cos, sin = real(*args)
        tables.extend(t.untyped_storage()._cdata for t in (cos, sin))
        return cos, sin

    real = llama.rope_tables
    monkeypatch.setattr(llama, "rope_tables", recorded)
    engine = RecordingEngine()
    model = _model(6, "offload", engine)
    _grads(model)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    keys = [k for _, k, _ in engine.given]
    assert engine.given and not params & set(keys)  # nn.Linear saves weight.t(): skipped by storage
    assert len(keys) == len(set(keys))  # a storage saved by several ops (and layers) moves once
    # The RoPE tables are saved by every layer: offloaded by the first offloaded layer only.
    assert [(layer, k) for layer, k, _ in engine.given if k in tables] == [(0, k) for k in tables]
    assert {layer for layer, _, _ in engine.given} == {0, 1, 2, 3}  # keep_last = 2 of 6


def _device_saved_bytes(layers: int, policy: str) -> int:
    """Saved bytes left on the device at the end of the forward: what the outer hook sees (kept blocks,
    the head, small tensors) plus what the engine still holds on the device."""
    engine = HostEngine(1)
    model = _model(layers, policy, engine)
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage()._cdata not in {p.untyped_storage()._cdata for p in model.parameters()}:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    mb = _mb()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(mb.tokens, mb.ctx, labels=mb.labels)
    device = sum(seen.values()) + engine.stats.device_bytes
    loss.backward()
    return device


@pytest.mark.parametrize("policy", ["offload", "memo"])  # memo with alpha = 1
@pytest.mark.parametrize("layers", [8, 16])
def test_device_resident_saved_bytes_are_the_kept_blocks(layers, policy):
    """keep_last = 2, depth k = 1: the device holds at most what a (keep_last + k)-layer model keeps
    under none (its blocks plus the same head, with its one logits chunk); the full model keeps
    ~layers / 3 times more."""
    offload = _device_saved_bytes(layers, policy)
    kept = _device_saved_bytes(2 + 1, "none")
    assert offload <= kept
    assert _device_saved_bytes(layers, "none") > (layers / 3) * 0.9 * offload


def test_engine_holds_bytes_whose_tensor_was_deleted_while_in_flight():
    """torchtune freed a tensor whose copy was still in flight; the engine keeps the bytes alive
    until the offload's wait, whoever else drops them."""
    engine = HostEngine(1)
    t = torch.arange(1024, dtype=torch.float32)
    data = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
    h = engine.offload(0, data)
    alive = weakref.ref(t)
    del t, data
    gc.collect()
    assert h.source is not None  # still referenced by the engine: the allocator cannot reuse it
    engine.begin_forward(1)  # layer 0's offload completes
    assert h.source is None and h.state == "host"
    engine.begin_backward(1)
    torch.testing.assert_close(engine.fetch(h).view(torch.float32), torch.arange(1024, dtype=torch.float32))
    assert alive() is None
    engine.end_step()
    assert engine.stats.host_bytes == 0


def _fsdp_case(param_dtype):
    """2 ranks, FSDP2 (gathered parameters are what Linear saves): offload equals none, and no
    offloaded storage is a gathered parameter (sizes of every parameter and of each block's
    all-gather buffer, in the compute dtype)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seqpar.train.build import build_model

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cfg = ModelConfig(n_layers=4, **CFG)
    out = []
    for policy in ("none", "offload"):
        engine = RecordingEngine()
        model = build_model(cfg, build_attention("reference", torch.device("cpu")), torch.device("cpu"), seed=0,
                            fsdp_mesh=mesh, param_dtype=param_dtype,
                            policies=[lambda m: apply_memory_policy(m.layers, policy, engine=engine, keep_last=1)])
        model.loss_chunk_tokens = 32
        mb = _mb(100)  # activation sizes are multiples of 100 tokens: none equals a parameter's by chance
        loss = model(mb.tokens, mb.ctx, labels=mb.labels)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        out.append((float(loss.detach()), grads, [n for _, _, n in engine.given]))
    elem = torch.finfo(param_dtype or torch.float32).bits // 8
    sizes = {p.numel() * elem for p in model.parameters()}
    sizes |= {sum(p.numel() for p in block.parameters()) * elem for block in model.layers}
    return out, sizes


@pytest.mark.parametrize("param_dtype", [None, torch.bfloat16])
def test_offload_under_fsdp_moves_no_gathered_parameter(dist_pool, param_dtype):
    for (ref_loss, ref, _), (loss, got, moved), param_sizes in (
            (r[0][0], r[0][1], r[1]) for r in dist_pool(2).run(_fsdp_case, param_dtype)):
        assert moved and not set(moved) & param_sizes, (sorted(set(moved)), sorted(param_sizes))
        assert loss == ref_loss
        for name, g in got.items():
            torch.testing.assert_close(g, ref[name], rtol=0, atol=0, msg=name)
