"""``seqpar bench adaptive``: adaptive scattering against every static degree, measured and predicted.

It first fits the cost-model profile on the devices it runs on (``seqpar profile`` under torchrun
with the same ranks, timing the arms' model), then trains the same varlen steps (same config,
seed and data) once per arm: ``static-d`` for every power-of-two degree d up to the world size
(every group of degree d, best-fit packing: the planner's ``static_best`` baseline, through the
executor) and ``adaptive`` (the planner's groups per micro-batch). Per arm it reports the measured
step time (median over steps >= 2; step 1 pays the warm-up), the planner's prediction for the
same steps and its error, tokens/s, the planning time and how much of it the previous step hid,
and the final loss; then the measured speedup of adaptive over the best static arm beside the
predicted one, and the planner's predictions for 64 A100s on the paper's length distributions.
A static degree whose d x K tokens cannot hold data.seq_len (K from the trainer's cost model) is
reported as not fitting without a launch, and so is a static run that stops on such a sequence.
Static arms pack best-fit into d x K-token buffers like ``static_best``: when a step's tokens fill
fewer than R / d buffers, the remaining groups idle (the "degrees" column shows it).

What the numbers mean where: on a CPU machine the times mean something only while every rank
has a core of its own (at most 2 ranks on a 2-core machine, one thread each: OMP_NUM_THREADS=1).
More ranks oversubscribe the cores, so groups the cost model assumes to run in parallel take
turns, and 4 or 8 ranks are functional checks only. The GPU machine this project can use is a
single device and NCCL refuses two ranks on one GPU, so multi-GPU speedups are not measured here:
the 64-GPU lines are the planner's predictions, not measurements.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from seqpar.bench.csv_rows import write_rows

NOT_MEASURED = (
    "Multi-GPU speedups were not measured: the project's GPU machine is a single device (NCCL refuses two ranks on "
    "one GPU), and on this CPU machine timings only mean something at <= 2 ranks (one core per rank)."
)
PREDICTED_NOTE = "The 64-GPU lines above are the planner's predictions, not measurements."
#: stderr of a static arm whose degree cannot hold the step's longest sequence (seqpar.scatter.plan_source.StaticPlans)
_NO_FIT_MARKS = ("static_degree", "cannot hold")
#: Workload of the 64-GPU predictions (what ``seqpar plan --dist F --world 64 --profile A100-40GB --deterministic`` plans).
PRED_PROFILE, PRED_MODEL, PRED_WORLD, PRED_BATCH, PRED_MAX_LEN = "A100-40GB", "gpt-7b", 64, 512, 196_608


@dataclass
class ArmSummary:
    """One arm. static_degree 0 is the adaptive planner; fits False: the degree cannot hold the
    longest sequence (nothing measured). Times in seconds, medians/means over ``steps_timed``."""

    arm: str
    static_degree: int
    fits: bool = True
    steps_timed: int = 0
    micro_batches: int = 0
    degrees: str = ""
    measured_step_s: float = math.nan
    predicted_step_s: float = math.nan
    tokens_per_s: float = math.nan
    plan_solve_s: float = math.nan
    plan_wait_s: float = math.nan
    final_loss: float = math.nan
    wall_s: float = math.nan

    @property
    def error_pct(self) -> float:
        """(predicted - measured) / measured, in percent."""
        return 100.0 * (self.predicted_step_s - self.measured_step_s) / self.measured_step_s

    @property
    def hidden_pct(self) -> float:
        """Share of the planning time hidden behind the previous step (NaN when planning took ~no time)."""
        if not self.plan_solve_s > 1e-3:
            return math.nan
        return 100.0 * min(1.0, max(0.0, 1.0 - self.plan_wait_s / self.plan_solve_s))


@dataclass
class Speedups:
    """Adaptive over the best static arm: by measured median, and by the planner's predictions."""

    measured_static: str
    measured: float
    predicted_static: str
    predicted: float


@dataclass
class BenchResult:
    """Every arm, the speedups, the 64-GPU predictions (empty with --no-64), the files written."""

    arms: list[ArmSummary]
    speedups: Speedups | None
    predictions_64: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    load_before: float = 0.0


# ---- pure: metrics to summaries, tables, CSV ---------------------------------------------------


def read_metrics(path: str) -> list[dict]:
    """The records of a run's metrics.jsonl, one dict per logged step."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def timed_records(records: list[dict], first_step: int = 2) -> list[dict]:
    """Records of steps >= first_step (step 1 pays the warm-up); all of them when there are no others."""
    later = [r for r in records if r["step"] >= first_step]
    return later or list(records)


def _median(records: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in records if r.get(key) is not None]
    return statistics.median(vals) if vals else math.nan


def _mean(records: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in records if r.get(key) is not None]
    return statistics.fmean(vals) if vals else math.nan


def summarize_arm(arm: str, static_degree: int, records: list[dict], wall_s: float = math.nan) -> ArmSummary:
    """One arm's summary from its metrics records (see ``ArmSummary``)."""
    if not records:
        raise ValueError(f"arm {arm}: no metrics records")
    timed = timed_records(records)
    first = timed[0]
    tokens = sum(float(r["tokens"]) for r in timed if "tokens" in r)
    seconds = sum(float(r["step_time_s"]) for r in timed)
    return ArmSummary(
        arm, static_degree, True, len(timed),
        micro_batches=int(first.get("micro_batches") or 0),
        degrees=str(first.get("degrees", "")),
        measured_step_s=_median(timed, "step_time_s"),
        predicted_step_s=_median(timed, "predicted_step_s"),
        tokens_per_s=tokens / seconds if tokens and seconds > 0 else math.nan,
        plan_solve_s=_mean(timed, "plan_solve_s"),
        plan_wait_s=_mean(timed, "plan_wait_s"),
        final_loss=float(records[-1]["loss"]),
        wall_s=wall_s,
    )


def is_no_fit_failure(text: str) -> bool:
    """Whether a failed static arm's output says its degree cannot hold the longest sequence."""
    return any(all(m in line for m in _NO_FIT_MARKS) for line in text.splitlines())


def speedups(arms: Sequence[ArmSummary]) -> Speedups | None:
    """Adaptive vs the best static arm that fits (least measured, resp. least predicted, step time)."""
    static = [a for a in arms if a.fits and a.static_degree > 0]
    adaptive = next((a for a in arms if a.fits and a.static_degree == 0), None)
    if not static or adaptive is None:
        return None
    by_measured = min(static, key=lambda a: a.measured_step_s)
    by_predicted = min(static, key=lambda a: a.predicted_step_s)
    return Speedups(by_measured.arm, by_measured.measured_step_s / adaptive.measured_step_s,
                    by_predicted.arm, by_predicted.predicted_step_s / adaptive.predicted_step_s)


def _num(x: float, fmt: str, width: int) -> str:
    return (f"{x:{fmt}}" if math.isfinite(x) else "n/a").rjust(width)


_HEADER = (f"{'arm':10s} {'mb':>3s} {'meas s':>8s} {'pred s':>8s} {'err %':>7s} {'tok/s':>8s} "
           f"{'solve s':>8s} {'wait s':>8s} {'hidden':>7s} {'loss':>7s}  degrees (step 2)")


def format_row(a: ArmSummary) -> str:
    """One line of ``format_table``."""
    if not a.fits:
        return f"{a.arm:10s} does not fit: {a.static_degree} rank(s) x K tokens cannot hold the longest sequence"
    return (f"{a.arm:10s} {a.micro_batches:3d} {_num(a.measured_step_s, '.3f', 8)} "
            f"{_num(a.predicted_step_s, '.3f', 8)} {_num(a.error_pct, '+.1f', 7)} {_num(a.tokens_per_s, '.0f', 8)} "
            f"{_num(a.plan_solve_s, '.3f', 8)} {_num(a.plan_wait_s, '.3f', 8)} {_num(a.hidden_pct, '.0f', 6)}"
            f"{'%' if math.isfinite(a.hidden_pct) else ' '} {_num(a.final_loss, '.3f', 7)}  {a.degrees}")


def format_table(arms: Sequence[ArmSummary]) -> str:
    """One row per arm: micro-batches, degrees, measured and predicted s/step, error, tok/s, planning, loss."""
    return "\n".join([_HEADER] + [format_row(a) for a in arms])


def format_speedups(sp: Speedups | None) -> str:
    """The measured and predicted speedup of adaptive over the best static arm, one line."""
    if sp is None:
        return "speedup: n/a (needs the adaptive arm and at least one static arm that fits)"
    return (f"speedup of adaptive over the best static arm: measured {sp.measured:.2f}x (vs {sp.measured_static}), "
            f"predicted {sp.predicted:.2f}x (vs {sp.predicted_static}, the planner's static best)")


def format_predictions_64(rows: Sequence[dict]) -> str:
    """The ``predict_64`` rows under a heading that says they are predictions."""
    if not rows:
        return ""
    head = (f"planner predictions (not measured): {PRED_WORLD} x {PRED_PROFILE}, {PRED_MODEL}, one step of "
            f"{PRED_BATCH} sequences <= {PRED_MAX_LEN:,} tokens per family, deterministic planner")
    lines = [head] + [
        f"  {r['family']:12s} adaptive {r['predicted_step_s']:8.2f} s/step  static best {r['static_step_s']:8.2f} s/step "
        f"(degree {r['static_degree']})  speedup {r['speedup']:.2f}x"
        for r in rows
    ]
    return "\n".join(lines)


def timing_note(nproc: int, cores: int | None, cuda: bool, load: float = 0.0) -> str:
    """Empty when the measured times mean something; else why they do not. load: the 1-minute load
    average before the bench started (other processes' demand for the cores)."""
    if cuda:
        return ""
    if nproc > (cores or 1):
        return (f"note: {nproc} ranks on {cores} CPU core(s) oversubscribe the cores (the cost model assumes groups run in "
                f"parallel): this run is a functional check, its times and speedups mean nothing")
    if load >= max(1.0, (cores or 1) / 2):
        return (f"note: the load average was {load:.1f} before the bench: other processes shared the {cores} core(s), "
                "so the times are noisy; rerun on an idle machine")
    return ""


CSV_FIELDS = ["arm", "static_degree", "fits", "steps_timed", "micro_batches", "degrees", "measured_step_s",
              "predicted_step_s", "error_pct", "tokens_per_s", "plan_solve_s", "plan_wait_s", "hidden_pct", "final_loss", "wall_s"]


def write_csv(arms: Sequence[ArmSummary], path: str) -> str:
    """One row per arm (empty cells where nothing was measured); returns path."""
    return write_rows(path, CSV_FIELDS, ([getattr(a, k) for k in CSV_FIELDS] for a in arms))


def write_predictions_csv(rows: Sequence[dict], path: str) -> str:
    """The ``predict_64`` rows as CSV; returns path."""
    fields = ["family", "predicted_step_s", "static_degree", "static_step_s", "speedup"]
    return write_rows(path, fields, ([r[k] for k in fields] for r in rows))


def plot(arms: Sequence[ArmSummary], path: str, title: str) -> bool:
    """Bars of measured and predicted s/step per arm that fits; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [a for a in arms if a.fits]
    x = range(len(shown))
    fig, ax = plt.subplots(figsize=(1.6 * len(shown) + 2.5, 3.5))
    ax.bar([i - 0.2 for i in x], [a.measured_step_s for a in shown], 0.4, label="measured (median)")
    ax.bar([i + 0.2 for i in x], [a.predicted_step_s for a in shown], 0.4, label="predicted (planner)")
    ax.set_xticks(list(x), [a.arm for a in shown])
    ax.set_ylabel("seconds per step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- 64-GPU predictions (planner only, no processes) --------------------------------------------


def predict_64(families: Sequence[str] | None = None, seed: int = 0) -> list[dict]:
    """The planner's step time and its static best for one step of each paper family on 64 A100s."""
    from seqpar.hardware import load_profile
    from seqpar.scatter.baselines import compare
    from seqpar.scatter.costmodel import build_cost_model
    from seqpar.scatter.planner import PlannerOptions
    from seqpar.scatter.workloads import PAPER_FAMILIES, resolve_model, synthetic_lengths

    cm = build_cost_model(load_profile(PRED_PROFILE), resolve_model(PRED_MODEL), PRED_WORLD)
    opts = PlannerOptions(time_limit_s=None, bound_time_s=0)  # deterministic: the same plan on any machine
    rows = []
    for fam in families or PAPER_FAMILIES:
        r = compare(cm, [synthetic_lengths(fam, PRED_BATCH, seed, PRED_MAX_LEN)], opts)
        sb = r["baselines"]["static_best"]
        rows.append({"family": fam, "predicted_step_s": r["predicted_step_s"], "static_degree": sb["degree"],
                     "static_step_s": sb["predicted_step_s"], "speedup": sb["speedup"]})
    return rows


# ---- processes: fit the profile, train the arms --------------------------------------------------


def static_degrees(nproc: int) -> list[int]:
    """1, 2, 4, ... up to nproc."""
    return [1 << k for k in range(nproc.bit_length()) if 1 << k <= nproc]


def arm_overrides(*, seq_len: int, tokens_per_step: int, steps: int, profile: str, capacity_tokens: int,
                  time_limit: float, static_degree: int) -> list[str]:
    """The overrides that make one arm (after the user's, so these win; ``run_arm`` adds run.output_dir)."""
    return ["parallel.algorithm=adaptive", "parallel.dp=1", "data.mode=varlen", f"data.seq_len={seq_len}",
            f"data.tokens_per_step={tokens_per_step}", f"train.steps={steps}", "checkpoint.save_final=false",
            "logging.progress=false", f"scatter.profile={profile}", f"scatter.capacity_tokens={capacity_tokens}",
            f"scatter.time_limit_s={time_limit}", f"scatter.static_degree={static_degree}"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank: the cost model's groups run side by side


def _run_logged(cmd: list[str], log_path: str) -> tuple[int, float]:
    """Run cmd with stdout and stderr into log_path; (exit code, wall seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()).returncode
    return rc, time.perf_counter() - start


def _tail(path: str, chars: int = 3000) -> str:
    with open(path) as f:
        return f.read()[-chars:]


def profile_cmd(nproc: int, output: str, model_yaml: str, lengths: Sequence[int]) -> list[str]:
    """``seqpar profile`` under torchrun on nproc ranks (bandwidths when nproc > 1)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "seqpar.launcher", "profile", "--output", output, "--model", model_yaml,
            "--lengths", ",".join(str(s) for s in lengths)]


def fit_lengths(seq_len: int) -> list[int]:
    """Lengths the profile times: seq_len / 8 up to seq_len, doubling."""
    return [max(16, seq_len >> k) for k in (3, 2, 1, 0)]


def fit_profile(config: str, overrides: list[str], nproc: int, out_dir: str, seq_len: int) -> str:
    """Fit the cost-model profile of the arms' model on these devices; returns the YAML path."""
    import yaml

    from seqpar.config import load_config

    model_yaml = os.path.join(out_dir, "profile_model.yaml")
    with open(model_yaml, "w") as f:  # the model after the user's overrides, which the profile must describe
        yaml.safe_dump({"model": dataclasses.asdict(load_config(config, overrides).model)}, f, sort_keys=False)
    path = os.path.join(out_dir, "profile.yaml")
    log = os.path.join(out_dir, "profile.log")
    rc, wall = _run_logged(profile_cmd(nproc, path, model_yaml, fit_lengths(seq_len)), log)
    if rc != 0 or not os.path.isfile(path):
        raise RuntimeError(f"seqpar profile failed (exit {rc}); end of {log}:\n{_tail(log)}")
    print(f"fitted the profile on {nproc} rank(s) in {wall:.0f} s: {path}", flush=True)
    return path


def static_degree_range(config: str, overrides: list[str], nproc: int) -> tuple[int, int]:
    """(least, greatest) static degree of the trainer's cost model for these overrides: the least holds
    data.seq_len (a static layout must hold the longest sequence the data can have, not only those
    of the steps sampled), the greatest is the largest group with an algorithm."""
    import torch

    from seqpar.config import load_config
    from seqpar.scatter.capacity import run_cost_model

    cfg = load_config(config, overrides)
    cm, _ = run_cost_model(cfg, nproc, torch.device("cuda" if torch.cuda.is_available() else "cpu"), nproc)
    return cm.min_degree(cfg.data.seq_len), cm.max_degree


def no_fit(arm: str, static_degree: int, wall_s: float = math.nan) -> ArmSummary:
    """The summary of a static arm whose degree cannot hold the longest sequence (says so)."""
    print(f"arm {arm}: does not fit, degree {static_degree} cannot hold the longest sequence", flush=True)
    return ArmSummary(arm, static_degree, fits=False, wall_s=wall_s)


def run_arm(arm: str, static_degree: int, config: str, overrides: list[str], nproc: int, out_dir: str) -> ArmSummary:
    """Train one arm in a fresh run dir (never a resume) and summarise its metrics."""
    run_dir = os.path.join(out_dir, arm)
    shutil.rmtree(run_dir, ignore_errors=True)
    log = os.path.join(out_dir, f"{arm}.log")
    cmd = [sys.executable, "-m", "seqpar.launcher", "train", config, *overrides, f"run.output_dir={run_dir}",
           "--nproc", str(nproc)]
    print(f"arm {arm}: training on {nproc} rank(s) (log {log})", flush=True)
    rc, wall = _run_logged(cmd, log)
    if rc != 0:
        if static_degree and is_no_fit_failure(_tail(log, 20000)):
            return no_fit(arm, static_degree, wall)
        raise RuntimeError(f"arm {arm} failed (exit {rc}); end of {log}:\n{_tail(log)}")
    return summarize_arm(arm, static_degree, read_metrics(os.path.join(run_dir, "metrics.jsonl")), wall)


def run_adaptive_bench(
    out_dir: str,
    *,
    config: str = "configs/tiny-cpu.yaml",
    overrides: Sequence[str] = (),
    nproc: int = 2,
    steps: int = 6,
    seq_len: int = 1024,
    tokens_per_step: int = 4096,
    capacity_tokens: int = 0,
    time_limit: float = 1.0,
    profile: str = "",
    skip_fit: bool = False,
    predict: bool = True,
) -> BenchResult:
    """Fit the profile (unless ``profile`` names one, or ``skip_fit`` reuses out_dir/profile.yaml), train
    every static arm that fits and the adaptive arm, predict 64 GPUs; write CSV (and PNG) into out_dir."""
    if nproc < 1 or steps < 1:
        raise ValueError(f"--nproc={nproc} and --steps={steps} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # before any process of ours
    user = list(overrides)
    if not profile:
        profile = os.path.join(out_dir, "profile.yaml")
        if skip_fit and not os.path.isfile(profile):
            raise ValueError(f"--skip-fit: {profile} does not exist; run once without --skip-fit or pass --profile")
        if not skip_fit:
            profile = fit_profile(config, user, nproc, out_dir, seq_len)

    def overrides_for(degree: int) -> list[str]:
        return user + arm_overrides(seq_len=seq_len, tokens_per_step=tokens_per_step, steps=steps, profile=profile,
                                    capacity_tokens=capacity_tokens, time_limit=time_limit, static_degree=degree)

    least, greatest = static_degree_range(config, overrides_for(0), nproc)
    arms = [run_arm(f"static-{d}", d, config, overrides_for(d), nproc, out_dir) if least <= d <= greatest
            else no_fit(f"static-{d}", d) for d in static_degrees(nproc)]
    arms.append(run_arm("adaptive", 0, config, overrides_for(0), nproc, out_dir))
    result = BenchResult(arms, speedups(arms), load_before=load)
    result.files.append(write_csv(arms, os.path.join(out_dir, "adaptive_bench.csv")))
    png = os.path.join(out_dir, "adaptive_bench.png")
    if plot(arms, png, f"adaptive vs static degrees, {nproc} rank(s), seq_len {seq_len}"):
        result.files.append(png)
    if predict:
        result.predictions_64 = predict_64()
        result.files.append(write_predictions_csv(result.predictions_64, os.path.join(out_dir, "predicted_64.csv")))
    return result


def format_report(result: BenchResult, nproc: int, cores: int | None, cuda: bool) -> str:
    """Table, speedup line, 64-GPU predictions, and what was not measured."""
    parts = [format_table(result.arms), format_speedups(result.speedups)]
    note = timing_note(nproc, cores, cuda, result.load_before)
    if note:
        parts.append(note)
    parts.append(NOT_MEASURED)
    if result.predictions_64:
        parts[-1:-1] = [format_predictions_64(result.predictions_64)]
        parts.append(PREDICTED_NOTE)
    return "\n".join(parts)
