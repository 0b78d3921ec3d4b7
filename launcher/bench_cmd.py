"""``seqpar bench data``: dataset decomposition vs concat-and-chunk (see seqpar.bench.data_bench)."""

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


def add_bench_commands(sub) -> None:
    """Register ``seqpar bench data`` on the top-level subparsers."""
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
