"""GPU-only checks of the Triton kernels: the compiled bf16 tensor-core path, longer sequences, determinism.

The CPU interpreter upcasts bf16 after loading, so only these tests exercise
bf16 dots and the autotuned tile sizes. Tolerances scale with the truth's
magnitude: bf16 rounds p before the P.V and dS^T.Q products (as FlashAttention does).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import reference
from seqpar.kernels import triton_attn as ta
from seqpar.kernels.varlen import doc_ids_and_positions
from tests.support.oracle import _max_err, oracle_attention, oracle_grads

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or ta.interpreting(),
    reason="needs a CUDA GPU with compiled Triton kernels; on CPU tests/kernels/test_triton.py runs the interpreter",
)


def _case(lengths, heads, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lengths)
    q, dout = (torch.randn(t, heads, head_dim, device="cuda", generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(t, kv_heads, head_dim, device="cuda", generator=g).to(dtype) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    doc, pos = doc_ids_and_positions(cu)
    return q, k, v, dout, (doc, pos, doc, pos)


@pytest.mark.parametrize("dtype,lengths,head_dim", [
    (torch.bfloat16, (1500, 300, 248), 128),
    (torch.float16, (1500, 300, 248), 64),
    (torch.bfloat16, (2048,), 64),
    (torch.float32, (700, 333), 128),
])
def test_compiled_kernel_matches_oracle(dtype, lengths, head_dim):
    q, k, v, dout, meta = _case(lengths, 8, 2, head_dim, dtype)
    kw = dict(causal=True, scale=head_dim**-0.5)
    truth = oracle_grads(q, k, v, dout, *meta, True, kw["scale"], attn=oracle_attention)
    out_r, lse_r = reference.block_attn_fwd(q, k, v, *meta, **kw)
    ref = (out_r, lse_r, *reference.block_attn_bwd(dout, q, k, v, out_r, lse_r, *meta, **kw))
    out, lse = ta.block_attn_fwd(q, k, v, *meta, **kw)
    tri = (out, lse, *ta.block_attn_bwd(dout, q, k, v, out, lse, *meta, **kw))
    rel = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, x, r, t in zip(("out", "lse", "dq", "dk", "dv"), tri, ref, truth):
        scale = float(t[torch.isfinite(t)].abs().max())
        err, base = _max_err(x, t), _max_err(r, t)
        assert err <= 2 * base + rel * scale, f"{name}: {err:.3e} vs reference {base:.3e}, |truth| {scale:.2f}"


def test_backward_is_deterministic():
    q, k, v, dout, meta = _case((3000, 1096), 16, 2, 128, torch.bfloat16, seed=1)
    kw = dict(causal=True, scale=128**-0.5)
    out, lse = ta.block_attn_fwd(q, k, v, *meta, **kw)
    first = ta.block_attn_bwd(dout, q, k, v, out, lse, *meta, **kw)
    for _ in range(3):
        again = ta.block_attn_bwd(dout, q, k, v, out, lse, *meta, **kw)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
