"""`seqpar bench scaling`: the pure spec, ratios, tables and plots on synthetic rows, and one
``--quick`` run through the CLI.

No assertion depends on a measured time: only on which rows ran, whether they are marked timed,
exact byte counts (against the cost model's formula) and that files were written.
"""

import csv
import math
import os

import pytest
import torch

from seqpar.bench.scaling_report import (
    CSV_FIELDS,
    ScalingRow,
    doc_lengths,
    format_markdown,
    make_spec,
    markdown_table,
    predicted,
    records,
    static_split,
    write_outputs,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNGS = ("tokens_per_s.png", "memory.png", "bytes.png")


def _png_ok(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_spec_presets_and_errors():
    spec = make_spec(quick=True, cuda=False, cores=2)
    assert spec.degrees == (2, 4) and spec.lengths == (256, 512) and spec.max_timed == 2
    assert spec.timed(2) and not spec.timed(4)
    assert make_spec(quick=False, cuda=False, cores=1).max_timed == 1
    assert make_spec(quick=False, cuda=True).degrees == ()  # one device: no SP degrees
    with pytest.raises(ValueError, match="must divide the number of attention heads 6"):
        make_spec(True, False, model="48,2,6,6", degrees="4")
    with pytest.raises(ValueError, match="multiple of 64"):
        make_spec(True, False, lengths="96")
    with pytest.raises(ValueError, match="power of two"):
        make_spec(True, False, degrees="3")
    with pytest.raises(ValueError, match="not one of"):
        make_spec(True, False, algorithms="ring,zigzag")
    with pytest.raises(ValueError, match="dim,layers,heads,kv_heads"):
        make_spec(True, False, model="64,2")
    # without Ulysses, a degree that does not divide the heads is fine (ring and hybrid pick their splits)
    assert make_spec(True, False, model="48,2,6,6", degrees="4", algorithms="ring").degrees == (4,)


def test_docs_splits_and_predicted_bytes():
    assert doc_lengths(512) == [256, 128, 64, 64] and sum(doc_lengths(1000)) == 1000
    cfg = make_spec(True, False).model
    assert static_split(cfg, "ring", 4) == (1, 4) and static_split(cfg, "ulysses", 4) == (4, 1)
    assert static_split(cfg, "hybrid", 2) is None and static_split(cfg, "hybrid", 4) == (2, 2)
    secs, nbytes = predicted(cfg, "local", 1, doc_lengths(512))
    assert secs > 0 and nbytes == 0
    # ring: every layer sends its KV shard (fwd) and KV + fp32 dKV (bwd) to the next rank r - 1 times
    kv = cfg.n_kv_heads * cfg.head_dim
    assert predicted(cfg, "ring", 2, [512])[1] == cfg.n_layers * 1 * 2 * 256 * kv * (2 * 4 + 4)


def _rows():
    return [ScalingRow("baseline", 1, 1, 1, 256, True, 0.02, 1e9, 8 << 20),
            ScalingRow("ring", 2, 1, 2, 256, True, 0.04, 1e9, 4 << 20, 1000, 0.03, 1000.0),
            ScalingRow("adaptive", 2, 0, 0, 256, True, 0.01, 1e9, 4 << 20, 0, 0.02, math.nan, "1+1"),
            ScalingRow("ulysses", 4, 4, 1, 256, False, math.nan, 1e9, 2 << 20, 500, 0.01, 500.0),
            ScalingRow("baseline", 1, 1, 1, 512, True, 0.05, 2e9, 16 << 20),
            ScalingRow("ring", 2, 1, 2, 512, True, 0.10, 2e9, 8 << 20, 2000, 0.05, 2000.0),
            ScalingRow("ulysses", 4, 4, 1, 512, False, math.nan, 2e9, 4 << 20, 1000, 0.02, 1000.0)]


def test_ratios_against_the_baseline():
    recs = records(_rows())
    ring = recs[1]
    assert ring["speedup_vs_baseline"] == pytest.approx(0.5) and ring["memory_vs_baseline"] == pytest.approx(0.5)
    assert ring["tokens_per_s"] == pytest.approx(256 / 0.04) and ring["predicted_vs_measured"] == pytest.approx(0.75)
    assert ring["tflops"] == pytest.approx(1e9 / 0.04 / 2 / 1e12) and math.isnan(ring["mfu"])
    assert recs[2]["speedup_vs_baseline"] == pytest.approx(2.0) and recs[2]["sp"] == "planner"
    untimed = recs[3]
    assert all(math.isnan(untimed[k]) for k in ("step_s", "tokens_per_s", "tflops", "speedup_vs_baseline"))
    assert untimed["memory_vs_baseline"] == pytest.approx(0.25) and untimed["bytes_sent_per_rank"] == 500


def test_outputs_from_synthetic_rows(tmp_path):
    files = write_outputs(_rows(), str(tmp_path), "synthetic; test", 2, 2)
    assert [os.path.basename(f) for f in files] == ["scaling.csv", "scaling.md", *PNGS]
    for png in PNGS:
        assert _png_ok(tmp_path / png), png
    got = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert list(got[0]) == CSV_FIELDS and len(got) == 7
    assert got[3]["timed"] == "False" and got[3]["step_s"] == "" and got[3]["bytes_sent_per_rank"] == "500"
    md = (tmp_path / "scaling.md").read_text()
    assert markdown_table(_rows()) in md and "degrees <= 2" in md and "memory and bytes only" in md
    assert "MFU is empty" in format_markdown(_rows(), "h", 2, 2)


def test_error_is_one_line(capsys):
    from seqpar.launcher.cli import main

    rc = main(["bench", "scaling", "--quick", "--model", "48,2,6,6", "--degrees", "4", "--output", "/nonexistent"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Ulysses degree 4 must divide" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command measures that one device instead of the CPU "
                    "gloo groups this test checks (its GPU path has no test here)")
def test_bench_scaling_quick(tmp_path, capsys, monkeypatch):
    """The --quick preset end to end: baseline, degree 2 (timed on >= 2 cores) and 4 (memory and bytes)."""
    from seqpar.launcher.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "scaling"
    rc = main(["bench", "scaling", "--quick", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    for png in PNGS:
        assert _png_ok(out / png), png
    rows = list(csv.DictReader(open(out / "scaling.csv")))
    want = [(a, d, n) for n in (256, 512) for a, d in [("baseline", 1)]]
    want += [(a, 2, n) for n in (256, 512) for a in ("ring", "ulysses", "adaptive")]
    want += [(a, 4, n) for n in (256, 512) for a in ("ring", "ulysses", "hybrid", "adaptive")]
    assert [(r["algorithm"], int(r["degree"]), int(r["seq_len"])) for r in rows] == want
    max_timed = min(2, os.cpu_count() or 1)
    for r in rows:
        timed = int(r["degree"]) <= max_timed
        assert r["timed"] == str(timed), r
        assert (r["step_s"] != "") == timed and (r["tokens_per_s"] != "") == timed, r
        assert r["mfu"] == "" and float(r["peak_mib_per_rank"]) > 0
        if r["algorithm"] in ("ring", "ulysses", "hybrid"):  # exact counts: the cost model's formula
            assert int(r["bytes_sent_per_rank"]) == float(r["predicted_bytes_per_rank"]) > 0, r
        if r["algorithm"] == "baseline":
            assert int(r["bytes_sent_per_rank"]) == 0 and float(r["speedup_vs_baseline"]) == 1.0
    by = {(r["algorithm"], int(r["degree"]), int(r["seq_len"])): r for r in rows}
    # sharding lowers the per-rank peak below the single process's at the same length
    assert float(by["ulysses", 4, 512]["peak_mib_per_rank"]) < float(by["baseline", 1, 512]["peak_mib_per_rank"])
    assert by["adaptive", 2, 512]["groups"] != ""
    md = (out / "scaling.md").read_text()
    assert "memory and bytes only" in md and "| ring | 4 | 1x4 | 512 | no |" in md
