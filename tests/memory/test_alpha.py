"""MEMO's alpha LP: the closed form against HiGHS, its bounds, and its one-line error."""

import math

import numpy as np
import pytest
from scipy.optimize import linprog

from seqpar.config import ModelConfig
from seqpar.memory.alpha import AlphaProblem, alpha_problem, format_solution, predicted_forward_s, solve_alpha
from seqpar.memory.estimate import MemoryLayout, estimate_memory

GIB = 2**30


def _highs(p: AlphaProblem) -> float:
    """max alpha s.t. the two constraints, 0 <= alpha <= 1, by HiGHS (dual simplex)."""
    a_ub = [[p.other_bytes], [p.offloaded_layers * p.other_bytes]]
    b_ub = [p.host_bytes_per_s * p.forward_s - p.fixed_bytes,
            p.host_budget_bytes - p.offloaded_layers * p.fixed_bytes]
    res = linprog([-1.0], A_ub=a_ub, b_ub=b_ub, bounds=[(0, 1)], method="highs")
    return float(res.x[0]) if res.status == 0 else 0.0  # infeasible bandwidth: alpha 0, offload exposed


def test_closed_form_equals_highs_on_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(200):
        fixed, other = rng.uniform(1e8, 1e10, 2)
        n = int(rng.integers(1, 40))
        p = AlphaProblem(fixed, other, forward_s=rng.uniform(0.01, 3.0), host_bytes_per_s=rng.uniform(5e9, 6e10),
                         host_budget_bytes=n * (fixed + rng.uniform(0, 1.5) * other), offloaded_layers=n)
        s = solve_alpha(p)
        if p.host_bytes_per_s * p.forward_s >= fixed:  # feasible at alpha = 0: the LP's optimum
            assert s.alpha == pytest.approx(_highs(p), abs=1e-7), p
            assert s.hidden
        else:
            assert s.alpha == 0.0 and not s.hidden and s.bound == "bandwidth"
        assert 0.0 <= s.alpha <= 1.0
        assert s.host_bytes <= p.host_budget_bytes * (1 + 1e-9)


def test_bounds_are_named_and_alpha_one_when_nothing_binds():
    free = AlphaProblem(1e9, 4e9, forward_s=1.0, host_bytes_per_s=50e9, host_budget_bytes=math.inf, offloaded_layers=30)
    assert solve_alpha(free).alpha == 1.0 and solve_alpha(free).bound == "none"
    slow = AlphaProblem(1e9, 4e9, forward_s=0.05, host_bytes_per_s=50e9, host_budget_bytes=math.inf, offloaded_layers=30)
    s = solve_alpha(slow)
    assert s.bound == "bandwidth" and s.alpha == pytest.approx((50e9 * 0.05 - 1e9) / 4e9)
    assert s.transfer_s == pytest.approx(0.05)
    small = AlphaProblem(1e9, 4e9, forward_s=1.0, host_bytes_per_s=50e9, host_budget_bytes=30 * 2e9, offloaded_layers=30)
    s = solve_alpha(small)
    assert s.bound == "host memory" and s.alpha == pytest.approx(0.25) and s.host_bytes == pytest.approx(60e9)
    assert "memo alpha 0.250 (host memory-bound; test)" in format_solution(small, s, "test")


def test_host_budget_below_the_fixed_part_is_a_one_line_error():
    p = AlphaProblem(1e9, 4e9, forward_s=1.0, host_bytes_per_s=50e9, host_budget_bytes=10 * GIB, offloaded_layers=30)
    with pytest.raises(ValueError, match=r"memory.host_budget_gib=10.0: memo offloads at least 27.9 GiB") as e:
        solve_alpha(p)
    assert "\n" not in str(e.value)


def test_llama_7b_1m_on_h100_with_a_host_budget_fits_where_full_does_not():
    """7B at 1M tokens, Ulysses 8: predicted block forward 2.3 s, 50 GB/s, 240 GiB host per rank."""
    m = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000)
    lay = MemoryLayout(algorithm="ulysses", ulysses=8, state_shards=8, precision="bf16", loss_chunk_tokens=2048)
    tokens = (1 << 20) // 8
    fwd = predicted_forward_s(m, tokens, 1 << 20, peak_flops=989.4e12)
    s = solve_alpha(alpha_problem(m, lay, tokens, fwd, 50e9, 240 * GIB))
    assert s.bound == "host memory" and 0.0 < s.alpha < 0.5 and s.hidden
    memo = estimate_memory(m, "memo", tokens, MemoryLayout(**{**lay.__dict__, "alpha": s.alpha}))
    usable = 0.9 * 80 * GIB
    assert memo.peak_bytes < usable < estimate_memory(m, "full", tokens, lay).peak_bytes
    assert memo.host <= 240 * GIB
