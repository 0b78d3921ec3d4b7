"""The CUDA transfer engine (pinned slabs, D2H/H2D streams, events): gradient parity with ``none``
and the races other libraries hit. CUDA only: on CPU the host engine's tests (test_offload.py)
cover the schedule, and these skip with the reason. Run by tools/device_check.sh's kernels part."""

import numpy as np
import pytest
import torch

from seqpar.attention import build_attention
from seqpar.config import ModelConfig
from seqpar.memory.checkpoint import apply_memory_policy
from seqpar.model.llama import Transformer
from seqpar.train.batch import make_microbatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA engine: needs a CUDA device (pinned memory, streams and events)")

CFG = ModelConfig(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=256)
T = 2048


def _engine(depth: int = 1, slab_bytes: int = 64 << 20):
    from seqpar.memory.cuda_engine import CudaEngine

    return CudaEngine(torch.device("cuda"), CFG.n_layers - 2, slab_bytes, depth)


def _grads(policy: str, engine=None, alpha: float = 1.0, stream: torch.cuda.Stream | None = None, steps: int = 1):
    """fp32 loss and gradients of ``steps`` forward/backward passes; ``stream``: run them on a side
    stream created after the engine (the engine must follow the current stream, not cache one)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(CFG, build_attention("reference", torch.device("cuda")))
    model.loss_chunk_tokens = 256
    apply_memory_policy(model.layers, policy, engine=engine, keep_last=2, alpha=alpha)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, T)
    mb = make_microbatch(tokens, np.array([0, 700, 1500, T], dtype=np.int32), torch.device("cuda"))
    ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.stream(torch.cuda.current_stream())
    with ctx:
        for _ in range(steps):
            loss = model(mb.tokens, mb.ctx, labels=mb.labels)
            loss.backward()
    torch.cuda.synchronize()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def _same(a, b, exact: bool = True):
    assert a[0] == pytest.approx(b[0], rel=0 if exact else 1e-6)
    for name, g in a[1].items():
        torch.testing.assert_close(g, b[1][name], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7, msg=name)


@pytest.mark.parametrize("depth", [1, 8])
def test_cuda_offload_equals_none_and_prefetches(depth):
    """depth 8 > layers: every reload must wait for its offload's event on the first iteration
    (Megatron's fine-grained offload once did not)."""
    ref = _grads("none")
    engine = _engine(depth)
    _same(_grads("offload", engine, steps=2), _grads("none", steps=2))
    assert engine.stats.offloaded_bytes > 0 and engine.stats.late_reloads == 0 and engine.overflow_bytes == 0
    assert engine.stats.device_bytes == 0 and engine.stats.host_bytes == 0
    assert ref[0] > 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_cuda_memo_equals_none(alpha):
    _same(_grads("memo", _engine(), alpha), _grads("none"), exact=alpha == 1.0)


def test_engine_follows_the_current_stream_not_one_cached_at_construction():
    """TRL cached the compute stream when the engine was built; FSDP2 and recomputation run on
    others. Here the whole step runs on a stream created after the engine."""
    engine = _engine()
    side = torch.cuda.Stream()
    _same(_grads("offload", engine, stream=side), _grads("none"))


def test_source_bytes_survive_deletion_while_the_copy_is_in_flight():
    """torchtune freed a tensor (under activation checkpointing) whose D2H copy was still running;
    the engine holds the bytes until the compute stream has waited on the copy's event."""
    engine = _engine()
    t = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    h = engine.offload(0, torch.empty(0, dtype=torch.uint8, device="cuda").set_(t.untyped_storage()))
    del t
    junk = [torch.full((1 << 20,), -1.0, device="cuda") for _ in range(8)]  # would reuse freed memory
    engine.begin_forward(1)
    engine.begin_backward(1)
    got = engine.fetch(h).view(torch.float32)
    torch.testing.assert_close(got, torch.arange(1 << 20, dtype=torch.float32, device="cuda"))
    del junk
    engine.end_step()


def test_small_slab_overflows_into_extra_pinned_memory_with_a_warning():
    engine = _engine(slab_bytes=4096)
    with pytest.warns(UserWarning, match="outgrew its"):
        _same(_grads("offload", engine), _grads("none"))
    assert engine.overflow_bytes > 0
