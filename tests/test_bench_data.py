"""`seqpar bench data` runs its three arms and writes what it promises (small budget)."""

import csv
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_data_small(small_store, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "seqpar.launcher", "bench", "data", "--store", small_store, "--max-log2", "8", "--min-log2", "5",
           "--tokens-per-step", "512", "--steps", "2", "--model", "32,2,4,2", "--cycles", "2", "--output", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "data_bench.csv")))
    assert [r["arm"] for r in rows] == ["concat_chunk-long", "concat_chunk-short", "decompose"]
    flops = {r["arm"]: float(r["attn_flops_per_token"]) for r in rows}
    # Cross-document windows pay the whole window; decomposition pays for its buckets only.
    assert flops["decompose"] < flops["concat_chunk-long"]
    assert flops["concat_chunk-short"] < flops["concat_chunk-long"]
    assert all(int(r["targets"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    schedule = list(csv.DictReader(open(out / "decompose_schedule.csv")))
    assert len(schedule) == 400 and {int(r["sequence_length"]) for r in schedule} <= {2**k for k in range(5, 9)}
    assert "vs long" in p.stdout
