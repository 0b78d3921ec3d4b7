"""Profiler: the least-squares fits recover known constants; the command writes a usable profile."""

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from seqpar.hardware import load_profile
from seqpar.launcher.cli import main
from seqpar.scatter.costmodel import build_cost_model
from seqpar.scatter.profiler import fit_bandwidth, fit_compute
from seqpar.scatter.workloads import resolve_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fit_compute_recovers_constants_within_noise():
    rng = np.random.default_rng(0)
    s = np.array([1024, 2048, 4096, 8192, 16384, 32768], dtype=float)
    a1, a2, b1 = 5.128e-9, 1.84e-4, 0.629  # FlexSP's GPT-7B constants in seconds
    t = (a1 * s * s + a2 * s + b1) * (1 + 0.01 * rng.standard_normal(s.size))
    f1, f2, f3 = fit_compute(s, t)
    assert f1 == pytest.approx(a1, rel=0.05) and f2 == pytest.approx(a2, rel=0.15) and f3 == pytest.approx(b1, rel=0.15)
    pred = f1 * s * s + f2 * s + f3
    assert np.max(np.abs(pred / t - 1)) < 0.06  # FlexSP reports < 6% estimation error
    with pytest.raises(ValueError, match="at least 3 lengths"):
        fit_compute([1, 2], [1.0, 2.0])


def test_fit_bandwidth():
    x = np.array([1e6, 4e6, 16e6])
    v, lat = fit_bandwidth(x, x / 96.5e9 + 2e-5)
    assert v == pytest.approx(96.5e9, rel=1e-6) and lat == pytest.approx(2e-5, rel=1e-6)
    v, lat = fit_bandwidth(x, np.array([1e-3, 1e-3, 1e-3]))  # flat timings: best observed rate
    assert v == pytest.approx(16e9) and lat >= 0


def test_profile_command_writes_a_profile_the_cost_model_reads(tmp_path, capsys):
    out = tmp_path / "measured.yaml"
    assert main(["profile", "--output", str(out), "--base", "A100-40GB", "--lengths", "32,64,96,128"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    data = yaml.safe_load(out.read_text())
    sc = data["scatter_compute"]
    assert sc["measured_lengths"] == [32, 64, 96, 128] and len(sc["measured_s"]) == 4
    assert sc["reference_model"]["dim"] == 256 and min(sc["a1_ms_per_token2"], sc["a2_ms_per_token"], sc["b1_ms"]) >= 0
    assert data["alltoall_bw_gbps"][16] == 10.3  # single process: the base's tables are kept
    cm = build_cost_model(load_profile(str(out)), resolve_model("llama-1b"), 8)
    assert cm.capacity > 0 and cm.a1 >= 0


def test_profile_under_torchrun_measures_bandwidths(tmp_path):
    out = tmp_path / "gloo.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "seqpar.launcher",
           "profile", "--output", str(out), "--base", "A100-40GB", "--lengths", "32,64,96"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    data = yaml.safe_load(out.read_text())
    assert set(data["alltoall_bw_gbps"]) == {2} and data["alltoall_bw_gbps"][2] > 0
    assert data["p2p_bw_gbps"]["intra_node"] > 0 and data["gpus_per_node"] == 2
    assert data["scatter_compute"]["b2_ms"] >= 0
