"""Checks each part's outputs for tools/device_check.sh and keeps the summary (summary.md, summary.json).

    python tools/device_check_report.py init   --dir DIR --mode gpu|dry --parts install,kernels,sync,bench,train,memory,offload
    python tools/device_check_report.py record --dir DIR --mode gpu|dry --part NAME --rc RC --seconds S [...]
    python tools/device_check_report.py final  --dir DIR        # prints the table; exit 1 unless every part passed

``record`` validates what the part wrote (JUnit XML, the sync check's JSON, the benchmark CSV,
the training metrics), extracts the key numbers and rewrites both summary files, so a run cut
short still leaves a summary of the parts that finished. Standard library only: it runs under
the GPU machine's python before anything else is known to work.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

WORK = "work"  # DIR/work: raw outputs, packed into DIR/extras.tar.gz at the end
PASSED, FAILED, TIMEOUT, PENDING = "passed", "FAILED", "TIMEOUT", "not run"
LOGS = {"install": "install.log in extras.tar.gz", "kernels": "kernels.log", "sync": "sync_check.log",
        "bench": "bench.log", "train": "train.log", "memory": "memory.log in extras.tar.gz",
        "offload": "offload.log in extras.tar.gz"}
#: The memory estimator's error budget against a measured peak (tests/memory/test_estimate.py's, on CPU).
MEMORY_TOLERANCE = 0.10
#: offload / memo gradients against selective's, relative to the largest: bf16 autocast, and memo's
#: token-local matmuls split in two row blocks (other GEMM tilings, other roundings).
OFFLOAD_GRAD_TOLERANCE = 5e-2


def _load(dir_: str) -> dict[str, Any]:
    with open(os.path.join(dir_, "summary.json")) as f:
        return json.load(f)


def _save(dir_: str, summary: dict[str, Any]) -> None:
    summary["passed"] = all(p["status"] == PASSED for p in summary["parts"])
    for name, text in (("summary.json", json.dumps(summary, indent=1)), ("summary.md", render(summary))):
        tmp = os.path.join(dir_, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(dir_, name))


def render(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table plus one line per problem."""
    lines = [
        f"# seqpar device check ({summary['mode']}): {'PASSED' if summary['passed'] else 'FAILED'}",
        "",
        f"{summary['started']} | {summary.get('device', '')}",
        "",
        "| part | status | seconds | key numbers |",
        "|---|---|---|---|",
    ]
    for p in summary["parts"]:
        secs = "" if p["seconds"] is None else f"{p['seconds']:.1f}"
        lines.append(f"| {p['part']} | {p['status']} | {secs} | {p.get('key', '')} |")
    problems = [f"- {p['part']}: {n}" for p in summary["parts"] for n in p.get("problems", [])]
    if problems:
        lines += ["", "Problems:", *problems]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One checker per part: (numbers, key text, problems) from what the part wrote.


def check_install(dir_: str, mode: str, args: argparse.Namespace) -> tuple[dict, str, list[str]]:
    """The last ``env: {...}`` line of install.log (python, torch, triton, cuda, device), as seqpar saw them."""
    numbers: dict[str, Any] = {"method": args.note}
    with open(os.path.join(dir_, WORK, "install.log")) as f:
        envs = [line[len("env: "):] for line in f if line.startswith("env: ")]
    if not envs:
        return numbers, args.note, ["seqpar, torch or triton did not import (see install.log in extras.tar.gz)"]
    numbers.update(json.loads(envs[-1]))
    problems = []
    if mode == "gpu" and not numbers["cuda"]:
        problems.append("torch sees no CUDA device: run this on the GPU machine, or use --dry on CPU")
    key = (f"{args.note}; python {numbers['python']}, torch {numbers['torch']}, triton {numbers['triton']}, "
           f"{numbers['device']}")
    return numbers, key, problems


def check_kernels(dir_: str, mode: str, args: argparse.Namespace) -> tuple[dict, str, list[str]]:
    path = os.path.join(dir_, WORK, "kernels_junit.xml")
    if not os.path.exists(path):
        return {}, "", ["no JUnit XML: pytest did not finish (see kernels.log)"]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    gpu_ran = gpu_skipped = 0
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        counts[outcome] += 1
        if case.get("classname", "").endswith("test_triton_gpu"):
            gpu_ran += outcome != "skipped"
            gpu_skipped += outcome == "skipped"
    problems = [f"{counts['failed']} test(s) failed or errored (see kernels.log)"] if counts["failed"] else []
    if sum(counts.values()) == 0:
        problems.append("no tests ran")
    if mode == "gpu" and (gpu_ran == 0 or gpu_skipped):
        problems.append(f"tests/kernels/test_triton_gpu.py: {gpu_ran} ran, {gpu_skipped} skipped; on a GPU all must run")
    numbers = {**counts, "gpu_tests_ran": gpu_ran}
    key = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; test_triton_gpu ran {gpu_ran}"
    return numbers, key, problems


def _work_json(dir_: str, name: str) -> Any:
    """A JSON file a part wrote into DIR/work, or None when it did not get that far."""
    path = os.path.join(dir_, WORK, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_sync(dir_: str, mode: str, args: argparse.Namespace) -> tuple[dict, str, list[str]]:
    r = _work_json(dir_, "sync_check.json")
    if r is None:
        return {}, "", ["no sync_check.json: the check did not finish (see sync_check.log)"]
    problems = []
    if r["host_syncs"]:
        problems.append(f"{r['host_syncs']} host sync(s): " + "; ".join(r["sync_sites"][:3]))
    worst = max(r["rel_err"].values(), default=math.nan)
    if not worst <= r["tolerance"]:
        problems.append(f"Triton vs reference: max relative error {worst:.2e} > {r['tolerance']:.0e} ({r['rel_err']})")
    numbers = {"host_syncs": r["host_syncs"], "max_rel_err": worst, "checked_ms": r["checked_ms"], "tokens": r["tokens"]}
    key = (f"{r['tokens']} tokens, {len(r['doc_lengths'])} docs, {r['dtype']}: {r['host_syncs']} host syncs; "
           f"max rel err {worst:.1e}; fwd+bwd {r['checked_ms']:.1f} ms")
    return numbers, key, problems


def _length_name(n: int) -> str:
    return f"T={n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"T={n}"


def check_bench(dir_: str, mode: str, args: argparse.Namespace) -> tuple[dict, str, list[str]]:
    path = os.path.join(dir_, WORK, "kernel_bench.csv")
    if not os.path.exists(path):
        return {}, "", ["no kernel_bench.csv: the benchmark did not finish (see bench.log)"]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    baseline = "sdpa_flash" if mode == "gpu" else "sdpa"
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else sorted({int(r["seq_len"]) for r in rows})
    by = {(r["impl"], int(r["seq_len"]), r["pass_"]): r for r in rows}
    problems, numbers, parts = [], {}, []
    for n in lengths:
        missing = [f"{i} {p}" for i in ("triton", "triton_packed") for p in ("fwd", "bwd", "fwd+bwd") if (i, n, p) not in by]
        if missing:
            problems.append(f"T={n}: no result for {', '.join(missing)} (skipped after an error? see bench.log)")
            continue
        ours, packed = by[("triton", n, "fwd+bwd")], by[("triton_packed", n, "fwd+bwd")]
        ratio = float(ours.get(f"speedup_vs_{baseline}") or "nan")
        one_doc = float(ours["ms"]) / float(packed["ms"])
        numbers[str(n)] = {"triton_tflops": float(ours["tflops"]), f"vs_{baseline}": ratio, "packed_vs_one_doc": one_doc}
        if (baseline, n, "fwd+bwd") not in by:
            problems.append(f"T={n}: no {baseline} baseline row (see bench.log)")
        parts.append(f"{_length_name(n)} {float(ours['tflops']):.3g} TFLOP/s = {ratio:.2f}x {baseline}, "
                     f"packed ({packed['docs_per_seq']} docs) {one_doc:.2f}x")
    return numbers, "Triton fwd+bwd: " + "; ".join(parts), problems


def check_train(dir_: str, mode: str, args: argparse.Namespace) -> tuple[dict, str, list[str]]:
    path = os.path.join(dir_, "train_metrics.jsonl")
    if not os.path.exists(path):
        return {}, "", ["no metrics.jsonl: the run did not get to a step (see train.log)"]
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    problems = []
    if args.steps and len(recs) != args.steps:
        problems.append(f"{len(recs)} step records, expected {args.steps}")
    if not recs:
        return {}, "", problems or ["metrics.jsonl is empty"]
    losses = [r["loss"] for r in recs]
    if not all(math.isfinite(x) for x in losses) or any(r.get("skipped") for r in recs):
        problems.append(f"non-finite or skipped steps: losses {losses}")
    elif len(recs) > 1 and not losses[-1] < losses[0]:
        problems.append(f"loss did not decrease: {losses[0]:.4f} -> {losses[-1]:.4f}")
    steady = recs[1:] or recs  # step 1 pays for compilation and autotuning
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    if mode == "gpu" and not mfus:
        problems.append("MFU is n/a: the GPU's hardware profile was not detected (cluster.profile=auto)")
    numbers = {
        "steps": len(recs),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "tflops_per_s": statistics.median(r["tflops_per_s"] for r in steady),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_gib": max(r.get("mem_peak_gib", 0.0) for r in recs),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
    }
    mfu = "n/a" if numbers["mfu"] is None else f"{100 * numbers['mfu']:.1f}%"
    key = (f"{len(recs)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; {numbers['tokens_per_s']:,.0f} tok/s, "
           f"{numbers['tflops_per_s']:.1f} TFLOP/s, MFU {mfu}, peak {numbers['peak_gib']:.2f} GiB")
    return numbers, key, problems


def check_memory(dir_: str, mode: str, args: argparse.Namespace) -> tuple[dict, str, list[str]]:
    r = _work_json(dir_, "memory_bench.json")
    if r is None:
        return {}, "", ["no memory_bench.json: the benchmark did not finish (see memory.log in extras.tar.gz)"]
    numbers = {f"{row['tokens']}-{row['policy']}": {"measured_mib": row["measured"] / 2**20,
                                                    "estimated_mib": row["estimated"] / 2**20, "error": row["error"]}
               for row in r["rows"]}
    problems = [f"T={row['tokens']} {row['policy']}: estimate {100 * row['error']:+.1f}% off the measured peak"
                for row in r["rows"] if not abs(row["error"]) <= MEMORY_TOLERANCE]
    key = "estimate vs peak: " + "; ".join(f"T={row['tokens']} {row['policy']} {row['measured'] / 2**20:.0f} MiB "
                                           f"({100 * row['error']:+.1f}%)" for row in r["rows"])
    return numbers, key, problems


def check_offload(dir_: str, mode: str, args: argparse.Namespace) -> tuple[dict, str, list[str]]:
    r = _work_json(dir_, "offload_bench.json")
    if r is None:
        return {}, "", ["no offload_bench.json: the benchmark did not finish (see offload.log in extras.tar.gz)"]
    base = {row["tokens"]: row["step_s"] for row in r["rows"] if row["policy"] == "selective"}
    numbers = {f"{row['tokens']}-{row['policy']}": {"step_s": row["step_s"], "vs_selective": row["step_s"] / base[row["tokens"]],
                                                    "peak_gib": row["peak_bytes"] / 2**30,
                                                    "offloaded_gib": row["offloaded_bytes"] / 2**30,
                                                    "grad_error": row["grad_error"]}
               for row in r["rows"]}
    problems = [f"T={row['tokens']} {row['policy']}: gradients {row['grad_error']:.1e} off selective's"
                for row in r["rows"] if not row["grad_error"] <= OFFLOAD_GRAD_TOLERANCE]
    problems += [f"T={row['tokens']} {row['policy']}: nothing offloaded" for row in r["rows"]
                 if row["policy"] in ("offload", "memo") and row["offloaded_bytes"] <= 0]
    key = "step time vs selective: " + "; ".join(
        f"T={row['tokens']} {row['policy']} x{row['step_s'] / base[row['tokens']]:.2f}" for row in r["rows"]
        if row["policy"] != "selective")
    return numbers, key, problems


CHECKS = {"install": check_install, "kernels": check_kernels, "sync": check_sync, "bench": check_bench, "train": check_train,
          "memory": check_memory, "offload": check_offload}


# ---------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    parts = ["install", *[p for p in args.parts.split(",") if p and p != "install"]]
    unknown = [p for p in parts if p not in CHECKS]
    if unknown:
        print(f"device_check_report: unknown part(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    summary = {
        "mode": args.mode,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": "",
        "passed": False,
        "parts": [{"part": p, "status": PENDING, "seconds": None, "rc": None, "numbers": {}, "key": "", "problems": []}
                  for p in parts],
    }
    _save(args.dir, summary)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    summary = _load(args.dir)
    try:
        numbers, key, problems = CHECKS[args.part](args.dir, summary["mode"], args)
    except Exception as e:  # unreadable outputs are this part's failure, not the report's
        numbers, key, problems = {}, "", [f"could not read the part's outputs: {type(e).__name__}: {e}"]
    if args.rc in (124, 137):
        status = TIMEOUT
        problems.insert(0, f"stopped by its {args.limit} s timeout (exit {args.rc}); see {LOGS[args.part]}")
    elif args.rc != 0:
        status = FAILED
        problems.insert(0, f"exit status {args.rc} (see {LOGS[args.part]})")
    else:
        status = FAILED if problems else PASSED
    if args.part == "install" and numbers.get("device"):
        summary["device"] = numbers["device"]
    entry = next(p for p in summary["parts"] if p["part"] == args.part)
    entry.update(status=status, seconds=args.seconds, rc=args.rc, numbers=numbers, key=key, problems=problems)
    _save(args.dir, summary)
    return 0


def cmd_final(args: argparse.Namespace) -> int:
    summary = _load(args.dir)
    for p in summary["parts"]:
        if p["status"] == PENDING and not p["problems"]:
            p["problems"] = [args.why_not_run or "did not run"]
    _save(args.dir, summary)
    print(render(summary))
    return 0 if summary["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device_check_report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init")
    p.add_argument("--dir", required=True)
    p.add_argument("--mode", choices=("gpu", "dry"), required=True)
    p.add_argument("--parts", required=True)
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("record")
    p.add_argument("--dir", required=True)
    p.add_argument("--part", choices=sorted(CHECKS), required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--limit", type=int, default=0, help="the part's timeout in seconds")
    p.add_argument("--note", default="", help="install: how seqpar was made importable")
    p.add_argument("--lengths", default="", help="bench: the lengths asked for")
    p.add_argument("--steps", type=int, default=0, help="train: the steps asked for")
    p.set_defaults(func=cmd_record)
    p = sub.add_parser("final")
    p.add_argument("--dir", required=True)
    p.add_argument("--why-not-run", default="", help="the problem to show for parts that never ran")
    p.set_defaults(func=cmd_final)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
