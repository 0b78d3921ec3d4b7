"""The pure parts of ``seqpar bench scaling``: what a run measures (``ScalingSpec``), its rows, the
cost model's predictions, and the tables, CSV and plots (rows in, text and files out).

Ratios are against the sp=1 baseline of the same length measured in the same run: speedup =
baseline step time / step time (timed rows only), memory = peak per rank / baseline peak.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from seqpar.bench.csv_rows import write_rows
from seqpar.config import ModelConfig

#: Static algorithms per degree (hybrid needs a Ulysses and a ring factor of at least 2 each).
STATIC = ("ring", "ulysses", "hybrid")
ALGORITHMS = (*STATIC, "adaptive")
#: CPU cost-model profile (its constants are rescaled to the bench's model by FLOPs).
CPU_PROFILE = "cpu"


@dataclass(frozen=True)
class ScalingSpec:
    """What one run measures. model: dim,layers,heads,kv_heads; degrees: SP degrees (world sizes of
    the spawned groups); lengths: tokens per step; steps: timed steps per row (median); max_timed:
    the largest degree whose times are measured (the others: memory and bytes only)."""

    model: ModelConfig
    degrees: tuple[int, ...]
    lengths: tuple[int, ...]
    algorithms: tuple[str, ...] = ALGORITHMS
    steps: int = 3
    max_timed: int = 2

    def __post_init__(self) -> None:
        from seqpar.parallel.dims import ulysses_head_error

        for a in self.algorithms:
            if a not in ALGORITHMS:
                raise ValueError(f"--algorithms: {a!r} is not one of {', '.join(ALGORITHMS)}")
        if self.steps < 1:
            raise ValueError(f"--steps={self.steps} must be >= 1")
        for d in self.degrees:
            if d < 2 or d & (d - 1):
                raise ValueError(f"--degrees: {d} must be a power of two >= 2 (degree 1 is the baseline, always run)")
            if "ulysses" in self.algorithms:
                err = ulysses_head_error(self.model.n_heads, self.model.n_kv_heads, d)
                if err:
                    raise ValueError(f"--degrees {d} with --algorithms ulysses: {err}")
        unit = 16 * max(self.degrees, default=1)  # L/8 splits into 2 x degree zigzag chunks
        for n in self.lengths:
            if n < unit or n % unit:
                raise ValueError(f"--lengths: {n} must be a positive multiple of {unit} (8 x 2 x the largest degree "
                                 f"{max(self.degrees, default=1)}: the L/8 documents split into 2 x degree zigzag chunks)")

    def timed(self, degree: int) -> bool:
        return degree <= self.max_timed


@dataclass
class ScalingRow:
    """One (algorithm, degree, length). algorithm "baseline" is sp=1 in one process. ulysses x ring:
    the static split (0 x 0 for adaptive: see ``groups``); times in seconds, NaN when untimed;
    peak_bytes and bytes_sent: the largest over ranks; predicted_*: the cost model (NaN: none)."""

    algorithm: str
    degree: int
    ulysses: int
    ring: int
    seq_len: int
    timed: bool
    step_s: float = math.nan
    flops: float = 0.0  # model FLOPs of the step (all ranks)
    peak_bytes: int = 0
    bytes_sent: int = 0
    predicted_step_s: float = math.nan
    predicted_bytes: float = math.nan
    groups: str = ""  # adaptive: group degrees per micro-batch, e.g. "1+1"
    device: str = "cpu"
    peak_flops: float = math.nan  # device peak FLOP/s (GPU profile), NaN when unknown

    @property
    def sp(self) -> str:
        return f"{self.ulysses}x{self.ring}" if self.ulysses else "planner"

    @property
    def tokens_per_s(self) -> float:
        return self.seq_len / self.step_s if self.timed else math.nan

    @property
    def tflops(self) -> float:
        """Achieved model TFLOP/s per rank (FLOPs / step time / degree)."""
        return self.flops / self.step_s / self.degree / 1e12 if self.timed else math.nan

    @property
    def mfu(self) -> float:
        return self.tflops * 1e12 / self.peak_flops if self.timed and self.peak_flops > 0 else math.nan

    @property
    def predicted_ratio(self) -> float:
        """predicted / measured step time."""
        return self.predicted_step_s / self.step_s if self.timed else math.nan


def doc_lengths(seq_len: int) -> list[int]:
    """The step's documents: L/2, L/4, L/8, L/8."""
    return [seq_len // 2, seq_len // 4, seq_len // 8, seq_len - seq_len // 2 - seq_len // 4 - seq_len // 8]


def cost_model(cfg: ModelConfig, world: int):
    """The planner's cost model of ``cfg`` on ``world`` CPU ranks (fp32 activations: 4 bytes)."""
    from seqpar.hardware import load_profile
    from seqpar.scatter.capacity import host_memory_gib
    from seqpar.scatter.costmodel import build_cost_model

    prof = dataclasses.replace(load_profile(CPU_PROFILE), device_memory_gib=host_memory_gib() / max(world, 1))
    return dataclasses.replace(build_cost_model(prof, cfg, world), elem_bytes=4)


def predicted(cfg: ModelConfig, algorithm: str, degree: int, lengths: list[int]) -> tuple[float, float]:
    """(step seconds, bytes per rank) the cost model predicts for a static group holding ``lengths``."""
    cm = cost_model(cfg, degree)
    algo = "local" if degree == 1 else algorithm
    secs = cm.group_time(lengths, degree, algo)
    if algo == "local":
        return secs, 0.0
    u, r = cm.split(degree, algo)
    if algo == "ulysses":
        nbytes = sum(cm.ulysses_bytes(s, degree) for s in lengths)
    elif algo == "ring":
        nbytes = sum(cm.ring_bytes(s, degree) for s in lengths)
    else:
        nbytes = sum(cm.ulysses_bytes(s, degree, u) + cm.ring_bytes(s, degree, r, cm.kv_hidden(u)) for s in lengths)
    return secs, nbytes


def static_split(cfg: ModelConfig, algorithm: str, degree: int) -> tuple[int, int] | None:
    """(ulysses, ring) of a static arm, None when the arm cannot run at this degree."""
    if algorithm == "ring":
        return 1, degree
    if algorithm == "ulysses":
        return degree, 1
    cm = cost_model(cfg, degree)
    if "hybrid" not in cm.algorithms(degree):
        return None
    return cm.split(degree, "hybrid")



#: Presets: (model dim,layers,heads,kv_heads, vocab, degrees, lengths, steps).
PRESETS = {
    "cpu-quick": ("64,2,8,4", 512, (2, 4), (256, 512), 2),
    "cpu": ("128,4,8,4", 512, (2, 4, 8), (1024, 2048, 4096, 8192), 3),
    "gpu-quick": ("1024,4,16,8", 32000, (), (2048, 4096), 3),
    "gpu": ("2048,8,16,8", 32000, (), (4096, 8192, 16384, 32768), 5),
}


def parse_model(model: str, vocab: int) -> ModelConfig:
    """``dim,layers,heads,kv_heads`` -> the model config (one clear error otherwise)."""
    try:
        dim, layers, heads, kv = (int(x) for x in model.split(","))
    except ValueError:
        raise ValueError(f"--model {model!r}: expected dim,layers,heads,kv_heads, e.g. 128,4,8,4") from None
    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, vocab_size=vocab)


def make_spec(quick: bool, cuda: bool, model: str = "", vocab: int = 0, degrees: str = "", lengths: str = "",
              algorithms: str = "", steps: int = 0, cores: int | None = None) -> ScalingSpec:
    """The run's spec: the preset for (quick, cuda), each non-empty argument replacing its part.
    A GPU run has no SP degrees (one device); CPU times are kept for degrees <= min(2, cores)."""
    m, v, d, n, s = PRESETS[("gpu" if cuda else "cpu") + ("-quick" if quick else "")]
    ints = lambda text, flag: tuple(int(x) for x in text.split(",") if x) if text else None  # noqa: E731
    try:
        degs, lens = ints(degrees, "--degrees"), ints(lengths, "--lengths")
    except ValueError:
        raise ValueError(f"--degrees {degrees!r} / --lengths {lengths!r}: expected comma-separated integers") from None
    return ScalingSpec(parse_model(model or m, vocab or v), () if cuda else (degs or d), lens or n,
                       tuple(a for a in algorithms.split(",") if a) if algorithms else ALGORITHMS, steps or s,
                       max_timed=min(2, cores or 1))



# ---- tables ---------------------------------------------------------------------------------------

CSV_FIELDS = ["algorithm", "degree", "sp", "seq_len", "timed", "step_s", "tokens_per_s", "tflops", "mfu",
              "peak_mib_per_rank", "bytes_sent_per_rank", "predicted_step_s", "predicted_vs_measured",
              "predicted_bytes_per_rank", "speedup_vs_baseline", "memory_vs_baseline", "groups", "device"]
TIMED_COLUMNS = ("step_s", "tokens_per_s", "tflops", "mfu", "predicted_vs_measured", "speedup_vs_baseline")


def _baseline(rows: Sequence[ScalingRow]) -> dict[int, ScalingRow]:
    return {r.seq_len: r for r in rows if r.algorithm == "baseline"}


def record(r: ScalingRow, base: ScalingRow | None) -> dict[str, float | int | str | bool]:
    """One row's CSV / table values (NaN where not measured)."""
    speedup = base.step_s / r.step_s if base is not None and r.timed and base.timed else math.nan
    memory = r.peak_bytes / base.peak_bytes if base is not None and base.peak_bytes else math.nan
    return {"algorithm": r.algorithm, "degree": r.degree, "sp": r.sp, "seq_len": r.seq_len, "timed": r.timed,
            "step_s": r.step_s, "tokens_per_s": r.tokens_per_s, "tflops": r.tflops, "mfu": r.mfu,
            "peak_mib_per_rank": r.peak_bytes / 2**20, "bytes_sent_per_rank": r.bytes_sent,
            "predicted_step_s": r.predicted_step_s, "predicted_vs_measured": r.predicted_ratio,
            "predicted_bytes_per_rank": r.predicted_bytes, "speedup_vs_baseline": speedup, "memory_vs_baseline": memory,
            "groups": r.groups, "device": r.device}


def records(rows: Sequence[ScalingRow]) -> list[dict[str, float | int | str | bool]]:
    base = _baseline(rows)
    return [record(r, base.get(r.seq_len)) for r in rows]


def write_csv(rows: Sequence[ScalingRow], path: str) -> str:
    """One line per row, empty cells where nothing was measured; returns path."""
    return write_rows(path, CSV_FIELDS, ([rec[k] for k in CSV_FIELDS] for rec in records(rows)))


def machine_note(rows: Sequence[ScalingRow], cores: int | None, max_timed: int) -> str:
    """Which rows are timed, on what."""
    if any(r.device == "cuda" for r in rows):
        return ("One CUDA device, sp=1 at every length (NCCL refuses two ranks on one GPU, so no SP degree is measured "
                "here); every row is timed; MFU against the device profile's bf16 peak.")
    return (f"CPU, {cores} core(s), gloo, one thread per rank. Timed columns ({', '.join(TIMED_COLUMNS)}) are "
            f"measured only for degrees <= {max_timed} (timed = True); larger degrees oversubscribe the cores and are "
            "measured for memory and bytes only (empty timed cells). MFU is empty: a CPU has no peak in its profile.")


_MD_COLUMNS = [("algorithm", "algorithm", "s"), ("degree", "degree", "d"), ("sp", "u x r", "s"), ("seq_len", "tokens", "d"),
               ("timed", "timed", "s"), ("step_s", "step s", ".4f"), ("tokens_per_s", "tok/s", ".0f"),
               ("speedup_vs_baseline", "x base", ".2f"), ("tflops", "TFLOP/s/rank", ".4f"), ("mfu", "MFU", ".1%"),
               ("peak_mib_per_rank", "peak MiB/rank", ".2f"), ("memory_vs_baseline", "mem x base", ".2f"),
               ("bytes_sent_per_rank", "bytes sent/rank", ",d"), ("predicted_bytes_per_rank", "pred bytes", ",.0f"),
               ("predicted_step_s", "pred s", ".4f"), ("predicted_vs_measured", "pred/meas", ".2f"), ("groups", "groups", "s")]


def _md(x: float | int | str | bool, fmt: str) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:{fmt}}" if math.isfinite(x) else "-"
    if isinstance(x, int) and fmt != "s":
        return f"{x:{fmt}}"
    return str(x) or "-"


def markdown_table(rows: Sequence[ScalingRow]) -> str:
    """The rows as a GitHub markdown table ("-": not measured / not applicable)."""
    lines = ["| " + " | ".join(h for _, h, _ in _MD_COLUMNS) + " |", "|" + "---|" * len(_MD_COLUMNS)]
    for rec in records(rows):
        lines.append("| " + " | ".join(_md(rec[k], f) for k, _, f in _MD_COLUMNS) + " |")
    return "\n".join(lines)


def format_markdown(rows: Sequence[ScalingRow], header: str, cores: int | None, max_timed: int, extra: str = "") -> str:
    """scaling.md: what was run, which columns are timed, the table (and the GPU kernel table)."""
    parts = ["# seqpar bench scaling", "", header, "", machine_note(rows, cores, max_timed), "",
             "Bytes: what each rank hands to the SP collectives (ring P2P, all-to-all) in one forward + backward; the "
             "gradient all-reduce (the same for every algorithm at a degree) is not counted. Predictions: the adaptive "
             "planner's cost model (cluster/profiles/cpu.yaml, rescaled to this model); the adaptive arm's `groups` "
             "are its groups per micro-batch (1 = a rank alone, ring4 = a ring of 4).", "", markdown_table(rows)]
    if extra:
        parts += ["", extra]
    return "\n".join(parts) + "\n"


def format_table(rows: Sequence[ScalingRow]) -> str:
    """Fixed-width console table (the markdown table's main columns)."""
    head = (f"{'algorithm':<9} {'deg':>3} {'u x r':>7} {'tokens':>7} {'step s':>8} {'tok/s':>8} {'x base':>6} "
            f"{'MiB/rank':>9} {'x base':>6} {'bytes/rank':>12} {'pred s':>8} {'p/m':>5}  groups")
    lines = [head]
    for rec in records(rows):
        lines.append(f"{rec['algorithm']:<9} {rec['degree']:>3} {rec['sp']:>7} {rec['seq_len']:>7} "
                     f"{_md(rec['step_s'], '.4f'):>8} {_md(rec['tokens_per_s'], '.0f'):>8} "
                     f"{_md(rec['speedup_vs_baseline'], '.2f'):>6} {_md(rec['peak_mib_per_rank'], '.2f'):>9} "
                     f"{_md(rec['memory_vs_baseline'], '.2f'):>6} {_md(rec['bytes_sent_per_rank'], ',d'):>12} "
                     f"{_md(rec['predicted_step_s'], '.4f'):>8} {_md(rec['predicted_vs_measured'], '.2f'):>5}  "
                     f"{rec['groups'] or ''}")
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------


def _arms(rows: Sequence[ScalingRow]) -> dict[tuple[str, int], list[ScalingRow]]:
    """(algorithm, degree) -> its rows by length, in first-seen order."""
    out: dict[tuple[str, int], list[ScalingRow]] = {}
    for r in rows:
        out.setdefault((r.algorithm, r.degree), []).append(r)
    return {k: sorted(v, key=lambda r: r.seq_len) for k, v in out.items()}


def _label(algorithm: str, degree: int) -> str:
    return "sp=1 baseline" if algorithm == "baseline" else f"{algorithm} sp={degree}"


def write_plots(rows: Sequence[ScalingRow], out_dir: str, title: str) -> list[str]:
    """tokens_per_s.png (timed rows), memory.png (every row), bytes.png (largest length, by degree)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"baseline": ("k", "o"), "ring": ("tab:blue", "s"), "ulysses": ("tab:orange", "^"),
              "hybrid": ("tab:green", "D"), "adaptive": ("tab:red", "v")}
    dashes = {1: "-", 2: "-", 4: "--", 8: ":"}
    files = []

    def save(fig, ax, name: str, ylabel: str, xlabel: str = "tokens per step") -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines cross every corner
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    arms = _arms(rows)
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for (a, d), rs in arms.items():
        timed = [r for r in rs if r.timed]
        if timed:
            c, m = styles.get(a, ("gray", "x"))
            ax.plot([r.seq_len for r in timed], [r.tokens_per_s for r in timed], color=c, marker=m,
                    linestyle=dashes.get(d, "-."), label=_label(a, d))
    ax.set_xscale("log", base=2)
    save(fig, ax, "tokens_per_s.png", "tokens/s (timed rows only)")

    fig, ax = plt.subplots(figsize=(8.5, 4))
    for (a, d), rs in arms.items():
        c, m = styles.get(a, ("gray", "x"))
        ax.plot([r.seq_len for r in rs], [r.peak_bytes / 2**20 for r in rs], color=c, marker=m,
                linestyle=dashes.get(d, "-."), label=_label(a, d) + ("" if rs[0].timed else " (untimed)"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    save(fig, ax, "memory.png", "peak MiB per rank (largest rank)")

    longest = max(r.seq_len for r in rows)
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for a in [a for a in styles if a != "baseline"]:
        rs = sorted((r for r in rows if r.algorithm == a and r.seq_len == longest), key=lambda r: r.degree)
        if not rs:
            continue
        c, m = styles[a]
        ax.plot([r.degree for r in rs], [r.bytes_sent for r in rs], color=c, marker=m, label=f"{a} measured")
        pred = [r for r in rs if math.isfinite(r.predicted_bytes)]
        if pred:
            ax.plot([r.degree for r in pred], [r.predicted_bytes for r in pred], color=c, marker="x", linestyle="none",
                    markersize=10, label=f"{a} cost model")
    ax.set_xscale("log", base=2)
    save(fig, ax, "bytes.png", f"bytes sent per rank, one step of {longest:,} tokens", "SP degree")
    return files


def write_outputs(rows: Sequence[ScalingRow], out_dir: str, header: str, cores: int | None, max_timed: int,
                  extra: str = "") -> list[str]:
    """scaling.csv, scaling.md and the three PNGs in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    files = [write_csv(rows, os.path.join(out_dir, "scaling.csv"))]
    md = os.path.join(out_dir, "scaling.md")
    with open(md, "w") as f:
        f.write(format_markdown(rows, header, cores, max_timed, extra))
    files.append(md)
    return files + write_plots(rows, out_dir, header.split(";")[0])
