"""``seqpar bench data``: dataset decomposition against concat-and-chunk on the same token budget.

Three arms train the same model from the same seed on the same number of target tokens:
concat-and-chunk at the long window (classic: attention crosses documents), concat-and-chunk at a
quarter of it, and decomposition with buckets up to the long window. Per arm it reports the
attention FLOPs per token of the streams actually trained on (exact, machine-independent),
measured tokens/s, and the loss at the end of the budget; ratios are against the long-window
baseline measured in the same run. It also writes the sequence length per step of the
decomposition schedule (the short-to-long sawtooth of cycles) as CSV and, with matplotlib, PNG.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass

from seqpar.config import Config, load_config
from seqpar.model.flops import attention_pairs


@dataclass
class ArmResult:
    name: str
    window: int
    steps: int
    targets: int
    attn_flops_per_token: float
    tokens_per_s: float
    final_loss: float
    wall_s: float


def _attention_flops_per_token(cfg: Config, step_data, steps: int, causal: bool = True) -> float:
    """Attention training FLOPs per token over the first ``steps`` steps (3 x 4 x h x d x pairs x layers)."""
    pairs = tokens = 0
    consumed = 0
    for step in range(steps):
        for s in step_data.rank_streams(step, consumed, 0, 1):
            lengths = (s.cu_seqlens[1:] - s.cu_seqlens[:-1]).tolist()
            pairs += attention_pairs(lengths, causal)
            tokens += sum(lengths)
        consumed += step_data.per_step
    m = cfg.model
    return 12.0 * m.n_layers * m.n_heads * m.head_dim * pairs / max(tokens, 1)


def _run_arm(name: str, window: int, overrides: list[str], steps: int, out_dir: str) -> ArmResult:
    import shutil

    from seqpar.train.data_setup import open_data
    from seqpar.train.trainer import train

    run_dir = os.path.join(out_dir, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time, never a resume
    overrides = overrides + [f"run.output_dir={run_dir}", f"train.steps={steps}", "checkpoint.save_final=false",
                             "logging.progress=false"]
    cfg = load_config(None, overrides)
    step_data, source = open_data(cfg, 0)
    cfg.model.vocab_size = source.vocab_size
    flops = _attention_flops_per_token(cfg, step_data, steps, causal=True)
    start = time.perf_counter()
    records = train(load_config(None, overrides))
    wall = time.perf_counter() - start
    timed = records[1:] or records  # the first step pays for warm-up
    tps = sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed)
    return ArmResult(name, window, steps, sum(r["targets"] for r in records), flops, tps, records[-1]["loss"], wall)


def run_data_bench(
    out_dir: str,
    *,
    store: str = "",
    max_log2: int = 13,
    min_log2: int = 8,
    tokens_per_step: int = 16384,
    steps: int = 8,
    model: tuple[int, int, int, int] = (128, 4, 4, 2),
    schedule_steps: int = 400,
    cycles: int = 8,
    seed: int = 1234,
) -> list[ArmResult]:
    """Run the three arms; write ``data_bench.csv``, ``decompose_schedule.csv`` (and ``.png``) into out_dir.

    store: token store prefix (empty: the embedded corpus); model: (dim, layers, heads, kv_heads).
    """
    from seqpar.data.corpus import embedded_corpus
    from seqpar.data.curriculum import DecomposedBatches
    from seqpar.data.decompose import decompose_store

    os.makedirs(out_dir, exist_ok=True)
    prefix = store or embedded_corpus()
    window, short = 2**max_log2, 2 ** (max_log2 - 2)
    dd_dir = os.path.join(out_dir, f"decomposed-{min_log2}-{max_log2}")
    if not os.path.exists(os.path.join(dd_dir, "manifest.json")):
        decompose_store(prefix, dd_dir, min_log2=min_log2, max_log2=max_log2, seed=seed, progress=True)
    dim, layers, heads, kv = model
    common = [f"model.dim={dim}", f"model.n_layers={layers}", f"model.n_heads={heads}", f"model.n_kv_heads={kv}",
              f"run.seed={seed}", f"data.tokens_per_step={tokens_per_step}", "parallel.fsdp=false", "train.warmup_steps=1"]
    arms = [
        ("concat_chunk-long", window, [f"data.path={prefix}", "data.mode=concat_chunk", f"data.seq_len={window}", "data.doc_mask=false"]),
        ("concat_chunk-short", short, [f"data.path={prefix}", "data.mode=concat_chunk", f"data.seq_len={short}", "data.doc_mask=false"]),
        ("decompose", window, [f"data.path={dd_dir}", "data.mode=decompose", f"data.seq_len={window}",
                               "data.curriculum=grow_p2", f"data.cycles={cycles}"]),
    ]
    results = [_run_arm(name, w, common + extra, steps, out_dir) for name, w, extra in arms]
    with open(os.path.join(out_dir, "data_bench.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "window", "steps", "targets", "attn_flops_per_token", "tokens_per_s", "final_loss", "wall_s"])
        for r in results:
            w.writerow([r.name, r.window, r.steps, r.targets, f"{r.attn_flops_per_token:.1f}", f"{r.tokens_per_s:.1f}",
                        f"{r.final_loss:.4f}", f"{r.wall_s:.1f}"])
    batches = DecomposedBatches(dd_dir, base_batch=max(1, tokens_per_step // window), curriculum="grow_p2",
                                cycles=cycles, seed=seed, num_steps=schedule_steps)
    lengths = [2 ** batches.step_bucket(s) for s in range(schedule_steps)]
    with open(os.path.join(out_dir, "decompose_schedule.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "sequence_length"])
        w.writerows(enumerate(lengths))
    _plot(lengths, os.path.join(out_dir, "decompose_schedule.png"), cycles)
    return results


def _plot(lengths: list[int], path: str, cycles: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(range(len(lengths)), lengths, drawstyle="steps-post", linewidth=0.8)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sequence length (tokens)")
    ax.set_title(f"Dataset decomposition, Grow-P2 curriculum, {cycles} cycles")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_table(results: list[ArmResult]) -> str:
    base = results[0]
    lines = [f"{'arm':20s} {'window':>7s} {'attn GFLOP/tok':>15s} {'vs long':>8s} {'tok/s':>9s} {'vs long':>8s} {'loss':>7s}"]
    for r in results:
        lines.append(
            f"{r.name:20s} {r.window:7d} {r.attn_flops_per_token / 1e9:15.4f} {r.attn_flops_per_token / base.attn_flops_per_token:8.3f} "
            f"{r.tokens_per_s:9.0f} {r.tokens_per_s / base.tokens_per_s:8.2f} {r.final_loss:7.3f}"
        )
    return "\n".join(lines)
