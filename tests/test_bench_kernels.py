"""seqpar bench kernels: exits 0 without a GPU, and its whole pipeline runs at tiny shapes on CPU."""

from __future__ import annotations

import csv

import pytest
import torch

from seqpar.bench.kernel_bench import causal_pairs, pass_flops
from seqpar.launcher.cli import main


def test_flop_counts():
    assert causal_pairs([4]) == 10 and causal_pairs([2, 2]) == 6
    f = pass_flops(10, heads=2, head_dim=8)
    assert f["fwd"] == 4 * 2 * 8 * 10 and f["bwd"] == 2.5 * f["fwd"] and f["fwd+bwd"] == 3.5 * f["fwd"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_without_gpu_says_so_and_exits_0(capsys):
    assert main(["bench", "kernels"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode is for machines without a GPU")
def test_cpu_smoke_writes_table_and_csv(tmp_path, capsys):
    rc = main(["bench", "kernels", "--cpu-smoke", "--lengths", "32", "--heads", "1", "--head-dim", "16",
               "--tokens", "32", "--repeats", "1", "--output", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "packed (4 docs) vs one document, T=32 fwd+bwd" in out
    rows = list(csv.DictReader(open(tmp_path / "kernel_bench.csv")))
    assert {(r["impl"], r["pass_"]) for r in rows} == {
        (i, p) for i in ("triton", "triton_packed", "sdpa") for p in ("fwd", "bwd", "fwd+bwd")
    }
    sdpa = [r for r in rows if r["impl"] == "sdpa"]
    assert all(float(r["speedup_vs_sdpa"]) == 1.0 for r in sdpa)
    packed = next(r for r in rows if r["impl"] == "triton_packed" and r["pass_"] == "fwd")
    assert float(packed["flops"]) == 4 * 16 * causal_pairs([8, 8, 8, 8])
