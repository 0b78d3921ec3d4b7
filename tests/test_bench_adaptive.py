"""`seqpar bench adaptive`: the pure summaries on synthetic metrics, and one small run of every arm.

No assertion depends on a measured time: only on which arms ran, that their numbers are finite,
and on arithmetic over synthetic records.
"""

import csv
import math
import os

import pytest

from seqpar.bench.adaptive_bench import (
    NOT_MEASURED,
    PREDICTED_NOTE,
    ArmSummary,
    format_predictions_64,
    format_report,
    format_table,
    is_no_fit_failure,
    speedups,
    static_degrees,
    summarize_arm,
    timed_records,
    timing_note,
    write_csv,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(times, predicted, solve=0.5, wait=0.1, mb=2, degrees="2 | 1+1"):
    return [{"step": k + 1, "loss": 5.0 - k, "tokens": 1000, "step_time_s": t, "predicted_step_s": p, "micro_batches": mb,
             "degrees": f"{degrees} #{k + 1}", "plan_solve_s": solve, "plan_wait_s": wait if k else 2.0}
            for k, (t, p) in enumerate(zip(times, predicted))]


def test_summarize_skips_the_first_step():
    recs = _records([9.0, 1.0, 3.0, 2.0], [7.0, 2.0, 2.0, 2.0])
    a = summarize_arm("adaptive", 0, recs)
    assert [r["step"] for r in timed_records(recs)] == [2, 3, 4]
    assert a.steps_timed == 3 and a.measured_step_s == 2.0 and a.predicted_step_s == 2.0
    assert a.error_pct == 0.0
    assert a.tokens_per_s == pytest.approx(3000 / 6.0)
    assert a.plan_solve_s == 0.5 and a.plan_wait_s == pytest.approx(0.1)  # step 1's wait is not averaged in
    assert a.hidden_pct == pytest.approx(80.0)
    assert a.final_loss == 2.0 and a.degrees == "2 | 1+1 #2" and a.micro_batches == 2


def test_summarize_edge_cases():
    one = summarize_arm("static-1", 1, _records([4.0], [5.0]))  # one step: it is the only sample
    assert one.steps_timed == 1 and one.measured_step_s == 4.0 and one.error_pct == pytest.approx(25.0)
    assert math.isnan(summarize_arm("static-1", 1, _records([1.0, 1.0], [1.0, 1.0], solve=0.0)).hidden_pct)
    assert summarize_arm("a", 0, _records([1.0, 1.0], [1.0, 1.0], solve=0.1, wait=0.5)).hidden_pct == 0.0  # clipped
    no_plan = [{"step": 1, "loss": 3.0, "step_time_s": 1.0}, {"step": 2, "loss": 2.0, "step_time_s": 2.0}]
    a = summarize_arm("x", 0, no_plan)
    assert math.isnan(a.predicted_step_s) and math.isnan(a.tokens_per_s) and a.measured_step_s == 2.0
    with pytest.raises(ValueError):
        summarize_arm("x", 0, [])


def test_speedups_pick_the_best_static_arm_that_fits():
    arms = [ArmSummary("static-1", 1, fits=False),
            ArmSummary("static-2", 2, measured_step_s=3.0, predicted_step_s=2.0),
            ArmSummary("static-4", 4, measured_step_s=2.0, predicted_step_s=4.0),
            ArmSummary("adaptive", 0, measured_step_s=1.0, predicted_step_s=1.0)]
    sp = speedups(arms)
    assert (sp.measured_static, sp.measured) == ("static-4", 2.0)
    assert (sp.predicted_static, sp.predicted) == ("static-2", 2.0)
    assert speedups(arms[:1] + arms[3:]) is None
    assert speedups(arms[:3]) is None


def test_no_fit_detection_and_degrees():
    msg = ("[rank0]: seqpar.scatter.executor.ExecutorError: the planner found no plan for step 1: scatter.static_degree=1 "
           "cannot hold the step's longest sequence (K=600 tokens per rank, at most 2 ranks per group)")
    assert is_no_fit_failure("noise\n" + msg)
    assert not is_no_fit_failure("config: scatter.static_degree=3 must be 0 (adaptive) or a power of two")
    assert static_degrees(1) == [1] and static_degrees(2) == [1, 2] and static_degrees(6) == [1, 2, 4]


def test_format_and_csv(tmp_path):
    arms = [ArmSummary("static-1", 1, fits=False),
            summarize_arm("static-2", 2, _records([2.0, 2.0, 2.0], [1.5, 1.5, 1.5], solve=0.0)),
            summarize_arm("adaptive", 0, _records([2.0, 1.0, 1.0], [1.2, 1.2, 1.2]))]
    table = format_table(arms)
    assert len(table.splitlines()) == 4 and "does not fit" in table and "+20.0" in table and "-25.0" in table
    rows = [{"family": "github", "predicted_step_s": 90.0, "static_degree": 32, "static_step_s": 120.0, "speedup": 1.33}]
    from seqpar.bench.adaptive_bench import BenchResult

    report = format_report(BenchResult(arms, speedups(arms), rows), 2, 2, False)
    assert "measured 2.00x (vs static-2)" in report and "predicted 1.25x" in report
    assert format_predictions_64(rows) in report and NOT_MEASURED in report and report.endswith(PREDICTED_NOTE)
    assert format_report(BenchResult(arms, None), 2, 2, False).endswith(NOT_MEASURED)  # --no-64
    assert "oversubscribe" in timing_note(4, 2, False) and timing_note(2, 2, False) == "" and timing_note(8, 2, True) == ""
    assert "noisy" in timing_note(2, 2, False, load=3.0) and timing_note(2, 2, True, load=3.0) == ""
    got = list(csv.DictReader(open(write_csv(arms, str(tmp_path / "a.csv")))))
    assert [r["arm"] for r in got] == ["static-1", "static-2", "adaptive"]
    assert got[0]["fits"] == "False" and got[0]["measured_step_s"] == ""
    assert float(got[2]["error_pct"]) == pytest.approx(20.0)


def test_bench_adaptive_small(small_store, tmp_path, capsys, monkeypatch):
    """Every arm on 2 ranks, 3 steps of a 32-dim model; K = 200 tokens per rank so that degree 1
    cannot hold data.seq_len = 256 (that arm is reported as not fitting, without a launch) and the
    planner needs groups of 2 for the 256-token sequences."""
    from seqpar.launcher.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "bench"
    rc = main(["bench", "adaptive", "--nproc", "2", "--steps", "3", "--seq-len", "256", "--tokens-per-step", "1024",
               "--capacity-tokens", "200", "--no-64", "--profile", "cluster/profiles/cpu.yaml", "--output", str(out),
               f"data.path={small_store}", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    rows = list(csv.DictReader(open(out / "adaptive_bench.csv")))
    assert [r["arm"] for r in rows] == ["static-1", "static-2", "adaptive"]
    assert rows[0]["fits"] == "False"
    for r in rows[1:]:
        assert r["fits"] == "True" and int(r["steps_timed"]) == 2
        for key in ("measured_step_s", "predicted_step_s", "error_pct", "tokens_per_s", "plan_solve_s", "plan_wait_s",
                    "final_loss"):
            assert math.isfinite(float(r[key])), (r["arm"], key, r[key])
    assert "2" in rows[2]["degrees"]  # 256-token sequences need groups of 2 ranks at K = 200
    assert "speedup of adaptive over the best static arm" in printed and NOT_MEASURED in printed
