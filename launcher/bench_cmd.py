"""``seqpar bench data`` (seqpar.bench.data_bench) and ``seqpar bench kernels`` (seqpar.bench.kernel_bench)."""

from __future__ import annotations

import argparse


def cmd_bench_data(args: argparse.Namespace) -> int:
    from seqpar.bench.data_bench import format_table, run_data_bench

    dim, layers, heads, kv = (int(x) for x in args.model.split(","))
    results = run_data_bench(
        args.output,
        store=args.store,
        max_log2=args.max_log2,
        min_log2=args.min_log2,
        tokens_per_step=args.tokens_per_step,
        steps=args.steps,
        model=(dim, layers, heads, kv),
        cycles=args.cycles,
    )
    print(format_table(results))
    print(f"wrote {args.output}/data_bench.csv, decompose_schedule.csv (and .png with matplotlib)")
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    import torch

    from seqpar.bench.kernel_bench import format_table, run_kernel_bench, write_outputs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.cpu_smoke:
        print(
            "seqpar bench kernels: no CUDA device here (torch.cuda.is_available() is False), so nothing was measured. "
            "Run it on a GPU machine; on CPU the kernels are only tested, under TRITON_INTERPRET=1 (pytest tests/kernels)."
        )
        return 0
    if device == "cpu":
        from seqpar.kernels.triton_attn import interpreting

        if not interpreting():
            print("seqpar bench kernels --cpu-smoke: set TRITON_INTERPRET=1 to run the Triton kernel on CPU")
            return 2
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = run_kernel_bench(
        lengths, heads=args.heads, head_dim=args.head_dim, tokens=args.tokens, docs=args.docs,
        repeats=args.repeats, device=device,
    )
    baseline = "sdpa_flash" if device == "cuda" else "sdpa"
    print(format_table(rows, baseline))
    print("wrote " + ", ".join(write_outputs(rows, args.output, baseline)))
    return 0


def add_bench_commands(sub) -> None:
    """Register ``seqpar bench data`` and ``seqpar bench kernels`` on the top-level subparsers."""
    bench = sub.add_parser("bench", help="benchmarks with ratios against a baseline measured in the same run")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("data", help="dataset decomposition vs concat-and-chunk at the same token budget")
    p.add_argument("--store", default="", help="token store prefix (default: the embedded corpus)")
    p.add_argument("--max-log2", type=int, default=13, help="long window 2^max (default 8K); the short arm uses 2^(max-2)")
    p.add_argument("--min-log2", type=int, default=8)
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--steps", type=int, default=8, help="steps per arm (the token budget is steps x tokens-per-step)")
    p.add_argument("--model", default="128,4,4,2", help="dim,layers,heads,kv_heads (default: the tiny-cpu model)")
    p.add_argument("--cycles", type=int, default=8)
    p.add_argument("--output", default="runs/bench-data", help="directory for CSV, PNG and the arms' run dirs")
    p.set_defaults(func=cmd_bench_data)

    p = kinds.add_parser("kernels", help="Triton attention vs torch SDPA (flash) and flash-attn: TFLOP/s by length (GPU)")
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072", help="comma-separated sequence lengths")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per call: shorter lengths run as several sequences")
    p.add_argument("--docs", type=int, default=4, help="documents in the packed arm (same total length)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", default="runs/bench-kernels", help="directory for kernel_bench.csv and .png")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny shapes, interpreter
    p.set_defaults(func=cmd_bench_kernels)
