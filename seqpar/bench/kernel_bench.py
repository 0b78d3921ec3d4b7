"""``seqpar bench kernels``: the Triton block attention against torch SDPA (flash backend) and flash-attn.

For each length T it times forward, backward and forward+backward of causal
attention, bf16, head_dim 128, on ``max(T, tokens)`` tokens: ``tokens // T``
sequences of T (a batch for SDPA and flash-attn, a packed stream for our
kernel, which has no batch axis). TFLOP/s use the exact count of visible
(query, key) pairs: forward 4*H*D*pairs, backward 2.5x that (FlashAttention's
convention). It also times our kernel on a stream of ``docs`` packed documents
of the same total length, where tile skipping should cut time about as much as
the pairs. Ratios are against SDPA's flash backend measured in the same run.
Without a CUDA device nothing is measured and the command says so.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Row:
    impl: str  # triton | triton_packed | sdpa_flash | flash_attn | flash_attn_packed
    seq_len: int
    tokens: int
    docs_per_seq: int
    pass_: str  # fwd | bwd | fwd+bwd
    ms: float
    tflops: float  # of the pairs this row actually computes
    flops: float


def causal_pairs(lengths: list[int]) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


def pass_flops(pairs: int, heads: int, head_dim: int) -> dict[str, float]:
    fwd = 4.0 * heads * head_dim * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn over repeats after two warm-up calls (the first one autotunes)."""

    def run(fn):
        fn()
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    return run


def _ours(q, k, v, dout, lengths: list[int]) -> dict[str, Callable[[], object]]:
    """fwd / bwd / fwd+bwd closures of the Triton kernel on a packed stream. q: [T, H, D]."""
    from seqpar.kernels import triton_attn as ta
    from seqpar.kernels.varlen import doc_ids_and_positions

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    doc, pos = doc_ids_and_positions(cu)
    meta = (doc, pos, doc, pos)
    kw = dict(causal=True, scale=q.shape[-1] ** -0.5)
    out, lse = ta.block_attn_fwd(q, k, v, *meta, **kw)

    def both():
        o, l = ta.block_attn_fwd(q, k, v, *meta, **kw)
        return ta.block_attn_bwd(dout, q, k, v, o, l, *meta, **kw)

    return {
        "fwd": lambda: ta.block_attn_fwd(q, k, v, *meta, **kw),
        "bwd": lambda: ta.block_attn_bwd(dout, q, k, v, out, lse, *meta, **kw),
        "fwd+bwd": both,
    }


def _autograd(fwd: Callable[[], torch.Tensor], leaves, dout) -> dict[str, Callable[[], object]]:
    """fwd / bwd / fwd+bwd closures for a library attention that runs under autograd."""
    out = fwd()

    def bwd():
        for x in leaves:
            x.grad = None
        out.backward(dout, retain_graph=True)

    def both():
        for x in leaves:
            x.grad = None
        fwd().backward(dout)

    def fwd_only():
        with torch.no_grad():
            return fwd()

    return {"fwd": fwd_only, "bwd": bwd, "fwd+bwd": both}


def _sdpa(q, k, v, dout, seqs: int, flash: bool):
    """SDPA on [B, H, L, D] views of the packed [T, H, D] tensors (equal-length sequences)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def to_bhld(x):
        t, h, d = x.shape
        return x.detach().reshape(seqs, t // seqs, h, d).transpose(1, 2).contiguous().requires_grad_(x.requires_grad)

    qb, kb, vb = (to_bhld(x).requires_grad_(True) for x in (q, k, v))
    db = to_bhld(dout)
    backends = [SDPBackend.FLASH_ATTENTION] if flash else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

    def fwd():
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True)

    return _autograd(fwd, (qb, kb, vb), db)


def _flash_attn(q, k, v, dout, lengths: list[int]):
    from flash_attn import flash_attn_varlen_func

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    longest = max(lengths)
    return _autograd(lambda: flash_attn_varlen_func(*leaves, cu, cu, longest, longest, causal=True), leaves, dout)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # an install built for another torch raises more than ImportError
        return False
    return True


def run_kernel_bench(
    lengths: list[int],
    heads: int = 16,
    head_dim: int = 128,
    tokens: int = 16384,
    docs: int = 4,
    repeats: int = 10,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    progress: Callable[[str], None] = print,
) -> list[Row]:
    """Time every implementation at every length; returns one Row per (impl, length, pass)."""
    dev = torch.device(device)
    timer = _timer(dev, repeats)
    rows: list[Row] = []
    for seq_len in lengths:
        total = max(seq_len, tokens)
        seqs = total // seq_len
        g = torch.Generator(device=dev).manual_seed(0)
        q, dout = (torch.randn(seqs * seq_len, heads, head_dim, device=dev, dtype=dtype, generator=g) for _ in range(2))
        k, v = (torch.randn(seqs * seq_len, heads, head_dim, device=dev, dtype=dtype, generator=g) for _ in range(2))
        piece = seq_len // docs
        packed = [piece] * (docs - 1) + [seq_len - piece * (docs - 1)]
        arms: list[tuple[str, list[int], Callable]] = [
            ("triton", [seq_len] * seqs, lambda: _ours(q, k, v, dout, [seq_len] * seqs)),
            ("triton_packed", packed * seqs, lambda: _ours(q, k, v, dout, packed * seqs)),
            ("sdpa_flash" if dev.type == "cuda" else "sdpa", [seq_len] * seqs,
             lambda: _sdpa(q, k, v, dout, seqs, flash=dev.type == "cuda")),
        ]
        if dev.type == "cuda" and flash_attn_available():
            arms.append(("flash_attn", [seq_len] * seqs, lambda: _flash_attn(q, k, v, dout, [seq_len] * seqs)))
            arms.append(("flash_attn_packed", packed * seqs, lambda: _flash_attn(q, k, v, dout, packed * seqs)))
        for impl, doc_lengths, make in arms:
            flops = pass_flops(causal_pairs(doc_lengths), heads, head_dim)
            try:
                fns = make()
                for name, fn in fns.items():
                    ms = timer(fn)
                    rows.append(Row(impl, seq_len, seqs * seq_len, len(doc_lengths) // seqs, name, ms,
                                    flops[name] / (ms * 1e-3) / 1e12, flops[name]))
                    progress(f"{impl:>17} T={seq_len:>7} {name:>7} {ms:9.3f} ms {rows[-1].tflops:7.1f} TFLOP/s")
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. SDPA has no flash kernel for this GPU
                progress(f"{impl:>17} T={seq_len:>7} skipped: {str(e).splitlines()[0][:120]}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def ratios(rows: list[Row], baseline: str) -> list[dict]:
    """Per (length, pass): each impl's time relative to baseline (>1 = faster than the baseline)."""
    base = {(r.seq_len, r.pass_): r.ms for r in rows if r.impl == baseline}
    out = []
    for r in rows:
        b = base.get((r.seq_len, r.pass_))
        out.append({**asdict(r), f"speedup_vs_{baseline}": (b / r.ms) if b else math.nan})
    return out


def format_table(rows: list[Row], baseline: str) -> str:
    head = f"{'impl':>17} {'T':>7} {'docs':>4} {'pass':>7} {'ms':>9} {'TFLOP/s':>8} {'vs ' + baseline:>14}"
    lines = [head]
    for r in ratios(rows, baseline):
        lines.append(
            f"{r['impl']:>17} {r['seq_len']:>7} {r['docs_per_seq']:>4} {r['pass_']:>7} {r['ms']:9.3f} "
            f"{r['tflops']:8.1f} {r[f'speedup_vs_{baseline}']:14.2f}"
        )
    # Packed vs one document of the same total length, from our own kernel.
    one = {(r.seq_len, r.pass_): r.ms for r in rows if r.impl == "triton"}
    for r in rows:
        if r.impl == "triton_packed" and (r.seq_len, r.pass_) in one:
            lines.append(f"packed ({r.docs_per_seq} docs) vs one document, T={r.seq_len} {r.pass_}: "
                         f"{one[(r.seq_len, r.pass_)] / r.ms:.2f}x faster")
    return "\n".join(lines)


def write_outputs(rows: list[Row], out_dir: str, baseline: str) -> list[str]:
    """kernel_bench.csv and, with matplotlib, kernel_bench.png (TFLOP/s against length per impl and pass)."""
    os.makedirs(out_dir, exist_ok=True)
    table = ratios(rows, baseline)
    paths = [os.path.join(out_dir, "kernel_bench.csv")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["impl"])
        w.writeheader()
        w.writerows(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    passes = ("fwd", "bwd", "fwd+bwd")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, name in zip(axes, passes):
        for impl in sorted({r.impl for r in rows}):
            pts = sorted((r.seq_len, r.tflops) for r in rows if r.impl == impl and r.pass_ == name)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"causal attention {name}")
        ax.set_xlabel("sequence length")
    axes[0].set_ylabel("TFLOP/s (visible pairs)")
    axes[0].legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "kernel_bench.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
