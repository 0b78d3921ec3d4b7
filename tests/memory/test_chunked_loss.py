"""The chunked LM head and loss: the same loss and gradients as full logits, one chunk of logits at a time."""

import pytest
import torch
import torch.nn.functional as F

from seqpar.memory.chunked_loss import chunked_head_loss
from seqpar.model.llama import token_loss_sum


def _inputs(t=37, d=16, v=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (t,), generator=g)
    labels[::5] = -100  # tokens without a target (a document's last token)
    return h, w, labels


@pytest.mark.parametrize("chunk", [0, 1, 8, 36, 37, 100])
def test_chunked_loss_and_gradients_equal_full_logits(chunk):
    h, w, labels = _inputs()
    ref = F.cross_entropy(F.linear(h, w), labels, ignore_index=-100, reduction="sum")
    (dh_ref, dw_ref) = torch.autograd.grad(ref * 0.3, (h, w))
    got = chunked_head_loss(h, w, labels, chunk)
    (dh, dw) = torch.autograd.grad(got * 0.3, (h, w))
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)  # fp32 accumulation of the loss
    torch.testing.assert_close(dh, dh_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-10, atol=1e-12)


def test_no_target_and_no_tokens():
    h, w, labels = _inputs(t=6)
    labels[:] = -100
    loss = chunked_head_loss(h, w, labels, 4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(h.grad.abs().sum()) == 0.0 and float(w.grad.abs().sum()) == 0.0
    h0 = torch.zeros(0, 16, dtype=torch.float64, requires_grad=True)
    chunked_head_loss(h0, w, labels[:0], 4).backward()
    assert h0.grad.shape == (0, 16)


def test_peak_memory_is_one_chunk_not_the_full_logits():
    """128K vocabulary, 16K tokens: allocation accounting (MemTracker on fake tensors: shapes and
    lifetimes, no arithmetic) of forward + backward, chunked vs full logits."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    v, d, t, chunk = 131072, 64, 16384, 1024
    peaks = {}
    for name in ("chunked", "full"):
        with FakeTensorMode():
            h = torch.randn(t, d, requires_grad=True)
            w = torch.randn(v, d, requires_grad=True)
            labels = torch.randint(0, v, (t,))
            tracker = MemTracker()
            tracker.track_external(h, w)
            with tracker:
                if name == "chunked":
                    loss = chunked_head_loss(h, w, labels, chunk)
                else:
                    loss = token_loss_sum(F.linear(h, w), labels)
                loss.backward()
            peaks[name] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    chunk_logits = chunk * v * 4
    inputs_and_grads = 2 * (t * d + v * d) * 4 + v * d * 4  # h, w, their grads, the fp32 weight-grad buffer
    assert peaks["chunked"] <= chunk_logits * 1.1 + inputs_and_grads, peaks
    assert peaks["full"] >= 2 * t * v * 4  # logits and their gradient: the control fails the bound above
    assert peaks["full"] > 20 * peaks["chunked"]


def _model_case(tie, chunk):
    """FSDP over 2 ranks: the model's chunked loss path vs full logits + cross-entropy, same gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seqpar.attention import build_attention
    from seqpar.config import ModelConfig
    from seqpar.train.batch import make_microbatch
    from seqpar.train.build import build_model

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, tie_embeddings=tie)
    cpu = torch.device("cpu")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tokens = (torch.arange(60) * (7 + dist.get_rank())) % 96
    mb = make_microbatch(tokens.numpy(), [0, 20, 45, 60], cpu)
    grads = []
    for use_chunks in (True, False):
        model = build_model(cfg, build_attention("auto", cpu), cpu, seed=3, fsdp_mesh=mesh)
        model.loss_chunk_tokens = chunk
        if use_chunks:
            loss = model(mb.tokens, mb.ctx, labels=mb.labels)
        else:
            loss = token_loss_sum(model(mb.tokens, mb.ctx), mb.labels)
        loss.backward()
        grads.append(({n: p.grad.full_tensor() for n, p in model.named_parameters()}, float(loss)))
    (a, la), (b, lb) = grads
    rel_grad = max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)) for n in b)
    return abs(la - lb) / abs(lb), rel_grad, sorted(a) == sorted(b)


@pytest.mark.parametrize("tie", [True, False])
def test_model_chunked_loss_under_fsdp_matches_full_logits(dist_pool, tie):
    for rel, err, same_names in dist_pool(2).run(_model_case, tie, 16):
        assert same_names and rel < 1e-6 and err < 1e-5, (rel, err)  # fp32: sums in another order
