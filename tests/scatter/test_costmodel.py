"""Cost model terms against the spec's closed forms, and the profile tables."""

import math

import pytest

from seqpar.config import ModelConfig
from seqpar.hardware import load_profile, profile_from_dict
from seqpar.scatter.costmodel import CostModelError, CostTable, build_cost_model
from seqpar.scatter.workloads import MODEL_PRESETS, resolve_model
from tests.scatter.tiny import tiny_cost_model


@pytest.fixture(scope="module")
def a100():
    return load_profile("A100-40GB")


def test_a100_profile_keeps_old_keys_and_adds_flexsp_tables(a100):
    assert a100.peak_tflops["bf16"] == 312.0 and a100.device_memory_gib == 40 and a100.inter_node_bw_gbps == 25
    assert a100.extra["alltoall_bw_gbps"][8] == 96.5 and a100.extra["alltoall_bw_gbps"][16] == 10.3
    sc = a100.extra["scatter_compute"]
    assert (sc["a1_ms_per_token2"], sc["a2_ms_per_token"], sc["b1_ms"]) == (5.128e-6, 0.184, 629.0)
    assert set(a100.extra["p2p_bw_gbps"]) == {"intra_node", "inter_node"}


def test_gpt7b_reproduces_published_constants_and_capacity(a100):
    cm = build_cost_model(a100, resolve_model("gpt-7b"), 64)
    assert cm.a1 == pytest.approx(5.128e-9) and cm.a2 == pytest.approx(1.84e-4) and cm.b1 == pytest.approx(0.629)
    # K = (0.9 x 40 GiB - model states) / 4.5 MB per token
    assert cm.capacity == int((0.9 * 40 * 2**30 - cm.state_bytes_per_rank) // 4.5e6)
    assert 7000 < cm.capacity < 8200
    assert cm.min_degree(cm.capacity) == 1 and cm.min_degree(cm.capacity + 1) == 2
    assert cm.min_degree(5 * cm.capacity) == 8
    # Larger models cost more per token and hold fewer tokens per rank.
    big = build_cost_model(a100, resolve_model("gpt-13b"), 64)
    assert big.a1 > cm.a1 and big.a2 > cm.a2 and big.capacity < cm.capacity


def test_ulysses_and_ring_volumes_follow_the_spec():
    cm = tiny_cost_model()
    s, d = 96, 4
    h, hkv, n, b = 32, 16, 4, 2
    # GQA: 2 KV heads replicated to 4 for an all-to-all over 4 ranks -> h_kv' = 4 x 8.
    assert cm.kv_hidden(4) == 32 and cm.kv_hidden(2) == 16
    assert cm.ulysses_bytes(s, d) == pytest.approx(n * 2 * (s / d) * (2 * h + 2 * 32) * b * (d - 1) / d)
    assert cm.ring_bytes(s, d) == pytest.approx(n * ((d - 1) * 2 * (s / d) * hkv * b + (d - 1) * 2 * (s / d) * hkv * (b + 4)))
    comp = (cm.a1 * s * s + cm.a2 * s) / d
    assert cm.seq_cost(s, d, "ulysses") == pytest.approx(comp + cm.ulysses_bytes(s, d) / cm.a2a_bw(4))
    # Ring: only the communication beyond the attention compute is exposed (d=4 spans 2 nodes).
    exposed = max(0.0, cm.ring_bytes(s, d) / cm.p2p_inter_bw - cm.a1 * s * s / d)
    assert cm.seq_cost(s, d, "ring") == pytest.approx(comp + exposed)
    assert cm.seq_cost(s, 1, "local") == pytest.approx(cm.a1 * s * s + cm.a2 * s)
    assert cm.group_time([s, s], d, "ulysses") == pytest.approx(cm.b1 + cm.b2 + 2 * cm.seq_cost(s, d, "ulysses"))


def test_algorithms_per_degree_and_hybrid_split(a100):
    cm = build_cost_model(a100, resolve_model("gpt-7b"), 64)
    assert cm.algorithms(1) == ["local"]
    assert cm.algorithms(64) == ["ring", "hybrid"]  # 32 heads: no Ulysses over 64 ranks
    assert cm.split(32, "hybrid") == (8, 4) and cm.split(16, "ulysses") == (16, 1) and cm.split(8, "ring") == (1, 8)
    # Bandwidth falls once an all-to-all spans nodes (FlexSP: 96.5 -> 10.3 GB/s).
    assert cm.a2a_bw(8) == 96.5e9 and cm.a2a_bw(16) == 10.3e9


def test_cost_table_matches_scalar_costs():
    cm = tiny_cost_model()
    lengths = [10, 90, 150, 399]
    tab = CostTable(cm, lengths)
    for d in (1, 2, 4):
        for a in cm.algorithms(d):
            for i, s in enumerate(lengths):
                assert tab.cost[d][a][i] == pytest.approx(float(cm.seq_cost(s, d, a)))
    t, a = tab.group(4, [2, 3])
    assert t == pytest.approx(min(cm.group_time([150, 399], 4, x) for x in cm.algorithms(4)))


def test_missing_tables_and_bad_models_give_one_line_errors():
    with pytest.raises(CostModelError, match="no 'scatter_compute' section.*seqpar profile"):
        build_cost_model(load_profile("H200"), ModelConfig(), 2)
    with pytest.raises(CostModelError, match="device_memory_gib is unknown"):  # CPU: the trainer passes host memory
        build_cost_model(load_profile("cpu"), ModelConfig(), 2)
    raw = {"name": "x", "peak_tflops": {}, "device_memory_gib": 1, "scatter_compute": {"a1_ms_per_token2": 1e-6,
           "a2_ms_per_token": 0.1, "b1_ms": 1}}
    with pytest.raises(CostModelError, match="no 'alltoall_bw_gbps' table"):
        build_cost_model(profile_from_dict(raw), ModelConfig(), 2)
    raw.update(alltoall_bw_gbps={2: 10}, p2p_bw_gbps={"intra_node": 10, "inter_node": 1})
    with pytest.raises(CostModelError, match="leave no room for activations"):
        build_cost_model(profile_from_dict(raw), resolve_model("gpt-30b"), 2)
    with pytest.raises(ValueError, match="--model 'gpt-9b' is unknown"):
        resolve_model("gpt-9b")
    assert set(MODEL_PRESETS) == {"gpt-7b", "gpt-13b", "gpt-30b", "llama-1b"}
    assert resolve_model("configs/tiny-cpu.yaml").dim > 0
    assert math.isfinite(build_cost_model(load_profile("A100-40GB"), resolve_model("llama-1b"), 8).a1)
