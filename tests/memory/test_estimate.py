"""The memory estimator against measurements: bytes autograd saves per token and layer (saved-tensor
hooks, every SP algorithm), and the peak of a training step for each policy (MemTracker)."""

import pytest
import torch

import seqpar.kernels.reference as reference
from seqpar.config import MEMORY_POLICIES, ModelConfig
from seqpar.memory.estimate import MemoryLayout, estimate_memory, layer_bytes, max_tokens
from seqpar.bench.memory_bench import CPU_SCORE_BLOCK_BYTES, run_memory_bench
from tests.memory.estimate_cases import offloaded_per_token_per_layer, saved_per_token_per_layer, sp_saved_per_token

GQA = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128)


@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_saved_bytes_per_token_and_layer_equal_autograd(precision):
    got = saved_per_token_per_layer(GQA, (128, 256), (128, 256), autocast=precision == "autocast")
    want = layer_bytes(GQA, "none", MemoryLayout(precision=precision)).saved
    assert got == pytest.approx(want, rel=1e-9), (got, want)


@pytest.mark.parametrize("policy,alpha", [("offload", 1.0), ("memo", 0.0), ("memo", 0.5), ("memo", 1.0)])
def test_offloaded_bytes_per_token_and_layer_equal_the_engine(policy, alpha):
    """What offload and memo move to the host per token and block: the block input, attention's
    tensors, and alpha of the token-local ops' (the estimator's memo_split)."""
    got = offloaded_per_token_per_layer(GQA, policy, alpha, (512, 1024))  # rsqrt rows >= MIN_BYTES in both
    lay = MemoryLayout(precision="fp32", alpha=alpha)
    assert got == pytest.approx(layer_bytes(GQA, policy, lay).saved, rel=1e-9), (got, layer_bytes(GQA, policy, lay))
    if policy == "memo" and alpha == 0.0:
        assert got == layer_bytes(GQA, "selective", lay).saved  # selective's tensors, all offloaded


@pytest.mark.parametrize("world,shapes", [
    (2, [("ring", 1, 2), ("ulysses", 2, 1)]),
    (4, [("ulysses", 4, 1), ("hybrid", 2, 2)]),  # 2 KV heads replicated up to the all-to-all's 4
])
def test_saved_bytes_under_sp_equal_autograd(dist_pool, world, shapes):
    for out in dist_pool(world).run(sp_saved_per_token, GQA, shapes, (256, 512)):
        for algorithm, u, r in shapes:
            lay = MemoryLayout(algorithm=algorithm, ulysses=u, ring=r, precision="fp32")
            assert out[algorithm] == pytest.approx(layer_bytes(GQA, "none", lay).saved, rel=1e-9), (algorithm, out)
    if world == 4:  # the all-to-all holds more per token than the ring: the layouts are told apart
        ring = layer_bytes(GQA, "none", MemoryLayout(algorithm="ring", ring=4, precision="fp32")).saved
        assert out["ulysses"] > ring


def test_saved_bytes_under_fsdp_bf16_equal_autograd(dist_pool):
    """The trainer's CUDA precision (FSDP with bf16 gathered parameters, fp32 norms and RoPE inside),
    on gloo: ring and Ulysses over 2 ranks."""
    shapes = [("ring", 1, 2), ("ulysses", 2, 1)]
    for out in dist_pool(2).run(sp_saved_per_token, GQA, shapes, (256, 512), True):
        for algorithm, u, r in shapes:
            lay = MemoryLayout(algorithm=algorithm, ulysses=u, ring=r, state_shards=2, precision="bf16")
            assert out[algorithm] == pytest.approx(layer_bytes(GQA, "none", lay).saved, rel=1e-9), (algorithm, out)


PEAK_MODEL = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512)


def test_estimated_peak_within_10_percent_of_measured():
    """`seqpar bench memory`'s measurement (MemTracker, fp32, reference attention with 1 MB score
    blocks: the default 64 MB would swamp activations this small) at two sizes, every policy (memo
    with alpha 0.5; offload and memo through the host engine, whose numpy pool MemTracker does not
    count, keep_last 2 of 4 blocks)."""
    rows = run_memory_bench(PEAK_MODEL, [1024, 2048], list(MEMORY_POLICIES), torch.device("cpu"), alpha=0.5)
    lay = MemoryLayout(precision="fp32", attention="reference", score_block_bytes=CPU_SCORE_BLOCK_BYTES,
                       loss_chunk_tokens=256, alpha=0.5)
    for r in rows:
        est = estimate_memory(PEAK_MODEL, r.policy, r.tokens, lay)
        assert est.peak_bytes == r.estimated and est.peak_bytes > 2 * est.states  # activations dominate
        assert abs(r.error) < 0.10, (r, est.rows())
    peaks = {(r.tokens, r.policy): r.measured for r in rows}
    for t in (1024, 2048):
        assert peaks[(t, "full")] < peaks[(t, "selective")] < peaks[(t, "none")]
        assert peaks[(t, "memo")] < peaks[(t, "offload")] < peaks[(t, "none")]
    assert reference.SCORE_BLOCK_BYTES == 64 << 20  # restored


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_estimated_memo_peak_within_10_percent_of_measured_for_every_alpha(alpha):
    """8 blocks (6 offloaded): the kept share is freed before the rest is recomputed, and alpha = 1
    is offload's peak."""
    m = ModelConfig(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=512)
    (r,) = run_memory_bench(m, [2048], ["memo"], torch.device("cpu"), alpha=alpha)
    assert abs(r.error) < 0.10, r
    if alpha == 1.0:
        (off,) = run_memory_bench(m, [2048], ["offload"], torch.device("cpu"))
        assert r.measured == off.measured and r.estimated == off.estimated


def test_longest_sequence_that_fits():
    lay = MemoryLayout(algorithm="ulysses", ulysses=8, state_shards=8, precision="bf16")
    m = ModelConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
    cap = {p: max_tokens(m, p, lay, 80 * 2**30) for p in ("none", "full", "selective")}
    assert 0 < cap["none"] < cap["selective"] < cap["full"], cap
    for p, t in cap.items():
        assert estimate_memory(m, p, t, lay).peak_bytes <= 80 * 2**30 < estimate_memory(m, p, t + 1, lay).peak_bytes
    assert max_tokens(m, "full", lay, 2**30) == 0  # the states alone do not fit


def test_bad_layouts_are_one_line_errors():
    with pytest.raises(ValueError, match="algorithm='zigzag'"):
        MemoryLayout(algorithm="zigzag")
    with pytest.raises(ValueError, match="memory.policy='memo2'"):
        layer_bytes(GQA, "memo2", MemoryLayout())
    with pytest.raises(ValueError, match="alpha=1.5"):
        MemoryLayout(alpha=1.5)
