"""`seqpar plan`: JSON fields, text output, inputs and one-line errors (run in-process)."""

import json

import pytest

from seqpar.launcher.cli import main


def _run(capsys, *args):
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_documented_fields(tmp_path, capsys):
    f = tmp_path / "lengths.txt"
    f.write_text("# one length per line\n" + "\n".join(str(x) for x in [100000, 30000, 9000, 4000, 800, 800, 300] * 6) + "\n")
    code, out, err = _run(capsys, "--lengths", str(f), "--world", "16", "--profile", "A100-40GB", "--json", "--time-limit", "0.3")
    assert code == 0, err
    obj = json.loads(out)
    for key in ("predicted_step_s", "lower_bound_s", "gap", "solve_s", "num_microbatches", "plan", "baselines",
                "memory_per_rank_gib"):
        assert key in obj, key
    assert set(obj["baselines"]) == {"static_best", "batch_adaptive", "greedy", "warm_start"}
    assert isinstance(obj["baselines"]["static_best"]["degree"], int)
    for b in obj["baselines"].values():
        assert b["predicted_step_s"] >= obj["lower_bound_s"] - 1e-9
    assert obj["lower_bound_s"] <= obj["predicted_step_s"] and obj["gap"] >= 0
    assert obj["plan"]["version"] == 1 and len(obj["plan"]["micro_batches"]) == obj["num_microbatches"]
    assert sorted(i for mb in obj["plan"]["micro_batches"] for g in mb for i in g["seq_ids"]) == list(range(42))
    assert obj["memory_per_rank_gib"] <= 40


def test_text_output_for_a_family_and_several_steps(capsys):
    code, out, err = _run(capsys, "--dist", "wikipedia", "--world", "32", "--profile", "A100-40GB", "--model", "gpt-13b",
                          "--batch-size", "64", "--steps", "2", "--time-limit", "0.2", "--max-len", "131072")
    assert code == 0, err
    for word in ("planner", "bound", "gap", "solve", "memory/rank", "static best", "batch-adaptive", "greedy", "mb  0"):
        assert word in out, word


def test_store_input(small_store, capsys):
    code, out, err = _run(capsys, "--store", small_store, "--world", "8", "--profile", "A100-40GB", "--model", "llama-1b",
                          "--batch-size", "32", "--json", "--time-limit", "0.2")
    assert code == 0, err
    assert json.loads(out)["sequences_per_step"] == [32]


@pytest.mark.parametrize("args, message", [
    (["--dist", "lognormal", "--world", "8", "--profile", "nope"], "unknown hardware profile 'nope'"),
    (["--dist", "lognormal", "--world", "8", "--profile", "A100-40GB", "--model", "gpt-2"], "--model 'gpt-2' is unknown"),
    (["--dist", "lognormal", "--world", "8", "--profile", "H200"], "no 'scatter_compute' section"),
    (["--dist", "lognormal", "--world", "8", "--profile", "cpu"], "device_memory_gib is unknown"),
    (["--dist", "lognormal", "--world", "0", "--profile", "A100-40GB"], "--world=0 must be >= 1"),
    (["--dist", "pareto", "--world", "16", "--profile", "A100-40GB", "--max-len", "1000000"], "split or drop it"),
    (["--dist", "pareto", "--world", "2", "--profile", "A100-40GB"], "leave no room for activations"),
])
def test_errors_are_one_line(capsys, args, message):
    code, out, err = _run(capsys, *args)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("seqpar: error: ") and message in lines[0], err


def test_empty_lengths_file(tmp_path, capsys):
    f = tmp_path / "empty.txt"
    f.write_text("\n")
    code, _, err = _run(capsys, "--lengths", str(f), "--world", "8", "--profile", "A100-40GB")
    assert code == 2 and "empty batch" in err
    f.write_text("12\nabc\n")
    code, _, err = _run(capsys, "--lengths", str(f), "--world", "8", "--profile", "A100-40GB")
    assert code == 2 and ":2: 'abc' is not an integer" in err


def test_json_stdout_is_one_document_in_a_fresh_process(tmp_path):
    """HiGHS writes its banner to fd 1 from C++ on the first ``Highs()`` of a process, which
    ``redirect_stdout`` cannot catch: in a fresh process, stdout must still parse as one JSON
    document (``seqpar plan ... --json | jq .``), strict (no NaN/Infinity)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "seqpar.launcher", "plan", "--dist", "github", "--world", "16", "--profile", "A100-40GB",
           "--model", "llama-1b", "--batch-size", "24", "--json", "--time-limit", "0.2", "--bound-time", "0.5"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    obj = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert obj["sequences_per_step"] == [24] and "HiGHS" not in p.stdout


def test_deterministic_plans_repeat_exactly(capsys):
    """--deterministic: no clock anywhere, so two runs print the same plan and numbers."""
    args = ["--dist", "commoncrawl", "--world", "16", "--profile", "A100-40GB", "--model", "llama-1b",
            "--batch-size", "32", "--json", "--deterministic"]
    runs = []
    for _ in range(2):
        code, out, err = _run(capsys, *args)
        assert code == 0, err
        obj = json.loads(out)
        for key in ("solve_s", "solve_cpu_s", "heuristic_s", "bound_s"):  # wall-clock reports
            obj.pop(key)
        obj["baselines"] = {k: {x: y for x, y in v.items() if not x.endswith("_s") or x == "predicted_step_s"}
                            for k, v in obj["baselines"].items()}
        runs.append(obj)
    assert runs[0] == runs[1]


def test_memory_policies_change_capacity_and_plan(capsys):
    """--memory a,b: K from the memory estimator per policy, and the plans side by side."""
    args = ["--dist", "github", "--world", "16", "--profile", "A100-40GB", "--model", "gpt-7b", "--batch-size", "32",
            "--max-len", "65536", "--deterministic", "--memory", "none,selective"]
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    per = json.loads(out)["memory_policies"]
    k = {p: o["capacity_tokens_per_rank"] for p, o in per.items()}
    assert 0 < k["none"] < k["selective"], k  # selective frees memory: a larger K
    assert all(o["capacity_from"] == f"memory estimator, --memory {p}" for p, o in per.items())
    assert per["selective"]["num_microbatches"] <= per["none"]["num_microbatches"]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    assert "K from the memory estimator per policy" in out
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["none", "selective"]
    code, out, err = _run(capsys, *args[:-1], "none,offload,memo", "--json")
    assert code == 0, err
    k = {p: o["capacity_tokens_per_rank"] for p, o in json.loads(out)["memory_policies"].items()}
    assert k["none"] < k["offload"] < k["memo"], k  # host memory holds what the device cannot
    code, out, err = _run(capsys, *args[:-1], "memo2")
    assert code == 2 and "--memory 'memo2'" in err and len(err.strip().splitlines()) == 1
