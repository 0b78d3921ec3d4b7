"""tools/device_check.sh: argument errors, and its --dry mode (every part on CPU, tiny sizes) passes.

The GPU mode itself needs a GPU machine; --dry runs the same steps, writes the same files and
goes through the same checks of their contents (tools/device_check_report.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "device_check.sh")
REPORT = os.path.join(REPO, "tools", "device_check_report.py")
PARTS = ["install", "kernels", "sync", "bench", "train", "memory", "offload"]
FILES = {"summary.md", "summary.json", "kernels.log", "sync_check.log", "bench.log", "train.log",
         "train_metrics.jsonl", "extras.tar.gz"}


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and not proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("device_check: error: "), proc.stderr
    return lines[0]


def test_unknown_flag_is_one_usage_line():
    line = _one_error_line(_run("--bogus"))
    assert "unknown argument '--bogus'" in line and "usage: bash tools/device_check.sh" in line


def test_bad_values_are_one_line_each():
    assert "--out needs a directory" in _one_error_line(_run("--out"))
    assert "unknown part 'nope'" in _one_error_line(_run("--parts", "kernels,nope"))
    assert "not found" in _one_error_line(_run("--dry", "--python", "/nonexistent/python3"))


def test_help_lists_the_options():
    proc = _run("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bash tools/device_check.sh"), proc.stderr
    for option in ("--out DIR", "--dry", "--quick", "--python PY", "--parts LIST"):
        assert option in proc.stdout


def test_dry_run_passes_and_writes_every_file(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry", "--out", str(out), "--python", sys.executable, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # the device tool returns at most 8 files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry" and summary["passed"] is True
    assert [(p["part"], p["status"]) for p in summary["parts"]] == [(p, "passed") for p in PARTS]
    md = (out / "summary.md").read_text()
    assert all(f"| {p} | passed |" in md for p in PARTS) and "PASSED" in md
    assert md.strip() in proc.stdout  # the same table is printed at the end
    with tarfile.open(out / "extras.tar.gz") as tar:
        members = {os.path.basename(m) for m in tar.getnames()}
    assert {"kernels_junit.xml", "sync_check.json", "kernel_bench.csv", "install.log", "train_config.yaml",
            "memory_bench.json", "memory.log", "offload_bench.json", "offload.log"} <= members
    numbers = {p["part"]: p["numbers"] for p in summary["parts"]}
    assert numbers["sync"]["host_syncs"] == 0
    assert numbers["kernels"]["passed"] > 0 and numbers["kernels"]["failed"] == 0
    assert set(numbers["bench"]) == {"16", "32"}
    assert set(numbers["memory"]) == {f"{t}-{p}" for t in (512, 1024)
                                      for p in ("none", "full", "selective", "offload", "memo")}
    assert all(abs(n["error"]) <= 0.10 for n in numbers["memory"].values()), numbers["memory"]
    assert set(numbers["offload"]) == {"256-selective", "256-offload", "256-memo"}
    assert numbers["offload"]["256-offload"]["grad_error"] == 0.0 and numbers["offload"]["256-memo"]["offloaded_gib"] > 0
    steps = [json.loads(line) for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] == list(range(1, numbers["train"]["steps"] + 1))


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True, timeout=600)


def test_report_fails_a_part_on_timeout_or_bad_outputs(tmp_path):
    """A timed-out part, failed tests and a part that never ran each make the summary fail."""
    d = str(tmp_path)
    assert _report("init", "--dir", d, "--mode", "gpu", "--parts", "kernels,sync,train").returncode == 0
    os.makedirs(tmp_path / "work")
    (tmp_path / "work" / "kernels_junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.kernels.test_triton_gpu" name="a"><skipped/></testcase>'
        '<testcase classname="tests.kernels.test_ranges" name="b"><failure/></testcase></testsuite></testsuites>'
    )
    assert _report("record", "--dir", d, "--part", "kernels", "--rc", "0", "--seconds", "1").returncode == 0
    assert _report("record", "--dir", d, "--part", "sync", "--rc", "124", "--seconds", "60", "--limit", "60").returncode == 0
    final = _report("final", "--dir", d, "--why-not-run", "did not run")
    assert final.returncode == 1 and "FAILED" in final.stdout
    parts = {p["part"]: p for p in json.loads((tmp_path / "summary.json").read_text())["parts"]}
    assert parts["kernels"]["status"] == "FAILED"
    assert any("1 test(s) failed" in s for s in parts["kernels"]["problems"])
    assert any("test_triton_gpu.py: 0 ran, 1 skipped" in s for s in parts["kernels"]["problems"])
    assert parts["sync"]["status"] == "TIMEOUT" and parts["train"]["problems"] == ["did not run"]


def test_sync_counter_sees_syncs_in_forward_and_backward():
    """The CPU proxy of CUDA's sync debug mode counts host reads in autograd backward too."""
    from seqpar.bench.sync_check import SyncCounter

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            grad.sum().item()
            return grad * 2

    x = torch.randn(8, requires_grad=True)
    with SyncCounter() as counter:
        y = ReadsInBackward.apply(x)
        bool(y[0] > 0)
        y.tolist()
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)  # sized: no sync
        y.sum().backward()
    assert counter.count == 3, counter.sites
    assert all(__file__ in site for site in counter.sites)
