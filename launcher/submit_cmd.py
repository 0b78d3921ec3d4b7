"""``seqpar submit``: render ``cluster/slurm/train.sbatch`` for a run and hand it to ``sbatch``.

    seqpar submit configs/tiny-cpu.yaml --nodes 1 --nproc-per-node 2 --gpus-per-node 0 --time 10 --wait
    seqpar submit configs/llama-1b-128k.yaml --nodes 4 --nproc-per-node 8 --time 1-00:00:00 --partition gpu

Writes RUN_DIR/slurm/config.yaml (the resolved config the job trains: later edits to the YAML do not
reach a requeued job) and RUN_DIR/slurm/train.sbatch, submits with ``sbatch --parsable``, prints the
job id and log, and appends them to RUN_DIR/slurm/jobs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _gpus_per_node(requested: int | None, nproc_per_node: int) -> int:
    """--gpus-per-node, or by default one per rank where the cluster has GPUs (Slurm's GRES say so)."""
    if requested is not None:
        return requested
    try:
        gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        gres = ""
    return nproc_per_node if "gpu" in gres else 0


def job_state(job_id: int) -> str | None:
    """JobState from ``scontrol show job``: "" once Slurm has forgotten the job ("Invalid job id"),
    None when scontrol gave no answer (a busy slurmctld times out): ask again."""
    try:
        p = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in p.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return "" if "Invalid job id" in p.stdout + p.stderr else None


def wait_for(job_id: int, run_dir: str, poll_s: float = 5.0, max_unanswered: int = 60) -> int:
    """Follow the job until it ends (a requeued job goes back to PENDING: keep waiting); 0 iff it
    completed and the run says done. ``max_unanswered`` polls in a row without an answer from
    scontrol end the wait (1, the job itself is left alone)."""
    from seqpar.train.preemption import read_status

    last, unanswered = "", 0
    while True:
        state = job_state(job_id)
        if state is None:
            unanswered += 1
            if unanswered >= max_unanswered:
                print(f"job {job_id}: scontrol gave no answer {unanswered} times in a row; stopped waiting "
                      f"(the job is not cancelled: follow it with `scontrol show job {job_id}`)", flush=True)
                return 1
            time.sleep(poll_s)
            continue
        unanswered = 0
        if state != last:
            print(f"job {job_id}: {state or 'gone'}", flush=True)
            last = state
        if state in TERMINAL or not state:
            status = read_status(run_dir).get("status", "none")
            print(f"job {job_id} ended {state or '(forgotten by slurmctld)'}; run status {status}", flush=True)
            return 0 if state in ("COMPLETED", "") and status == "done" else 1
        time.sleep(poll_s)


def cmd_submit(args: argparse.Namespace) -> int:
    from seqpar.config import ConfigError, load_config, save_config
    from seqpar.launcher.slurm import TEMPLATE, SubmitOptions, parse_env, parse_job_id, render_sbatch
    from seqpar.parallel.dims import ParallelDimsError

    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = os.path.abspath(cfg.run.output_dir)
        slurm_dir = os.path.join(run_dir, "slurm")
        opts = SubmitOptions(
            config=os.path.join(slurm_dir, "config.yaml"), run_dir=run_dir, nodes=args.nodes, nproc_per_node=args.nproc_per_node,
            gpus_per_node=0 if args.gpus_per_node is None else args.gpus_per_node, time=args.time,
            workdir=os.getcwd(), partition=args.partition, account=args.account, qos=args.qos, mode=args.mode,
            max_requeues=args.max_requeues, sbatch_args=tuple(args.sbatch_arg), env=parse_env(args.env), setup=args.setup,
            python="python" if args.setup else sys.executable, job_name=f"seqpar-{cfg.run.name}")
        opts.validate()  # cheap checks first: no sinfo call for a bad --nodes
        cfg.parallel_dims(args.nodes * args.nproc_per_node)  # the trainer's own validation, before anything is queued
        from seqpar.train.data_setup import check_data_path

        check_data_path(cfg)
        cfg.run.output_dir = run_dir
        opts = replace(opts, gpus_per_node=_gpus_per_node(args.gpus_per_node, args.nproc_per_node))
        with open(args.template or TEMPLATE) as f:
            script = render_sbatch(opts, f.read())
    except (ConfigError, ParallelDimsError, ValueError, OSError) as e:
        print(f"seqpar: error: {e}", file=sys.stderr)
        return 2
    if args.print_script:
        print(script, end="")
        return 0
    os.makedirs(slurm_dir, exist_ok=True)
    save_config(cfg, opts.config)
    path = os.path.join(slurm_dir, "train.sbatch")
    with open(path + ".tmp", "w") as f:
        f.write(script)
    os.replace(path + ".tmp", path)
    try:
        done = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    except FileNotFoundError:
        print("seqpar: error: sbatch is not on PATH: run seqpar submit on a Slurm login node", file=sys.stderr)
        return 2
    if done.returncode != 0:
        print(f"seqpar: error: sbatch refused {path}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}",
              file=sys.stderr)
        return 2
    job_id = parse_job_id(done.stdout)
    log = os.path.join(slurm_dir, f"slurm-{job_id}.out")
    print(f"submitted job {job_id} ({opts.mode} mode, {opts.nodes} x {opts.nproc_per_node} ranks): log {log}; "
          f"status {os.path.join(opts.run_dir, 'status.json')}", flush=True)
    with open(os.path.join(slurm_dir, "jobs.jsonl"), "a") as f:
        f.write(json.dumps({"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "script": path,
                            "config": opts.config, "log": log, "mode": opts.mode, "nodes": opts.nodes,
                            "nproc_per_node": opts.nproc_per_node, "gpus_per_node": opts.gpus_per_node,
                            "time": opts.time}) + "\n")
    if args.wait:
        return wait_for(job_id, opts.run_dir)
    return 0


def add_submit_command(sub) -> None:
    p = sub.add_parser("submit", help="submit a training run to Slurm (renders cluster/slurm/train.sbatch)")
    p.add_argument("config", help="YAML config, e.g. configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks per node")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: one per rank where the cluster has GPUs; 0 for a CPU cluster)")
    p.add_argument("--time", required=True, help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--mode", default="srun", help="srun (one task per rank, default) or torchrun (one task per node)")
    p.add_argument("--max-requeues", type=int, default=3, help="requeues after preemption (SIGUSR2) before giving up")
    p.add_argument("--sbatch-arg", action="append", default=[], help="an extra #SBATCH line, e.g. --sbatch-arg=--exclusive")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE exported in the job (repeatable)")
    p.add_argument("--setup", default="", help="shell command run first in the job, e.g. 'source ~/venv/bin/activate'")
    p.add_argument("--template", default="", help="batch template (default: cluster/slurm/train.sbatch)")
    p.add_argument("--print-script", action="store_true", help="print the batch script and exit (writes nothing)")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends; exit 0 iff the run completed")
    p.set_defaults(func=cmd_submit)
