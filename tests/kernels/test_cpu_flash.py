"""The CPU fast path (torch's fused CPU flash kernel on blocks of whole documents) against the
fp64 oracle: causal and full, MHA / GQA / MQA, packed awkward lengths (equal-length documents
adjacent and apart, length-1 documents), fp32 tight and bf16 within 2x the reference's own error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpar.kernels import cpu_flash, varlen_attention
from tests.support.oracle import _max_err, oracle_grads, oracle_varlen

AWKWARD = (17, 1, 17, 5, 64, 17, 2, 1, 33)  # 17s apart (a gather), 1s apart, one long document
ADJACENT = (16, 16, 16, 16)  # one bucket, a view (what dataset decomposition's buckets give)


def _run(lens, heads, kv_heads, causal, dtype, impl, dim=16):
    g = torch.Generator().manual_seed(0)
    t = sum(lens)
    q, k, v, dout = (torch.randn(t, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads, heads))
    cu = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)
    scale = dim**-0.5
    leaves = [x.to(dtype).requires_grad_(True) for x in (q, k, v)]
    out, lse = varlen_attention(*leaves, cu, causal=causal, scale=scale, impl=impl, return_lse=True)
    out.backward(dout.to(dtype))
    truth = oracle_grads(q, k, v, dout, list(lens), causal, scale, attn=oracle_varlen)
    got = (out.detach(), lse, *(x.grad for x in leaves))
    for x, name in zip(got, ("out", "lse", "dq", "dk", "dv")):
        assert x.dtype == (torch.promote_types(dtype, torch.float32) if name == "lse" else dtype), (name, x.dtype)
    return [_max_err(x, ref) for x, ref in zip(got, truth)]


@pytest.mark.parametrize("lens", [AWKWARD, ADJACENT])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_cpu_fast_path_matches_oracle(lens, causal, heads, kv_heads):
    fast = _run(lens, heads, kv_heads, causal, torch.float32, "sdpa_cpu")
    assert max(fast) <= 2e-5, fast
    fast16 = _run(lens, heads, kv_heads, causal, torch.bfloat16, "sdpa_cpu")
    ref16 = _run(lens, heads, kv_heads, causal, torch.bfloat16, "reference")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), fast16, ref16):
        assert a <= 2 * b + 2e-3, (name, a, b)


def test_cpu_fast_path_gqa_by_repeat_when_the_op_lacks_it(monkeypatch):
    """The K/V-repeat fallback (older torch whose op rejects grouped K/V) gives the same result."""
    native = _run(AWKWARD, 4, 2, True, torch.float32, "sdpa_cpu")
    monkeypatch.setattr(cpu_flash, "native_gqa", lambda: False)
    repeated = _run(AWKWARD, 4, 2, True, torch.float32, "sdpa_cpu")
    assert max(repeated) <= 2e-5 and max(native) <= 2e-5, (native, repeated)


def test_buckets_and_views():
    cu = np.cumsum([0, *AWKWARD])
    got = {n: list(s) for n, s in cpu_flash.buckets(cu)}
    assert got == {1: [17, 123], 2: [121], 5: [35], 17: [0, 18, 104], 33: [124], 64: [40]}
    adjacent = cpu_flash._Bucket(16, np.array([0, 16, 32]), torch.device("cpu"))
    x = torch.randn(48, 2, 4)
    assert adjacent.adjacent and adjacent.take(x).data_ptr() == x.data_ptr(), "adjacent documents are a view"
    apart = cpu_flash._Bucket(17, np.array([0, 18, 104]), torch.device("cpu"))
    assert not apart.adjacent


def test_whole_documents_detected_on_the_host():
    from seqpar.attention.layout import build_layout
    from seqpar.attention.meta import StreamMeta

    cu = np.cumsum([0, *AWKWARD])
    contiguous = StreamMeta(cu, build_layout(cu, "contiguous", ulysses=2), torch.device("cpu"))
    assert np.array_equal(contiguous.block([0, 1]).whole, cu)  # Ulysses' gathered tokens: the stream
    assert contiguous.block([0]).whole is None  # a document cut at the rank boundary
    zig = StreamMeta(cu, build_layout(cu, "zigzag", ring=2), torch.device("cpu"))
    assert zig.block([0, 1]).whole is None  # gathered in rank order, not stream order
