"""``seqpar bench data`` (seqpar.bench.data_bench), ``seqpar bench kernels`` (seqpar.bench.kernel_bench),
``seqpar bench adaptive`` (seqpar.bench.adaptive_bench), ``seqpar bench memory`` (seqpar.bench.memory_bench) and
``seqpar bench scaling`` (seqpar.bench.scaling_bench)."""

from __future__ import annotations

import argparse
import os
import sys


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


def cmd_bench_adaptive(args: argparse.Namespace) -> int:
    import torch

    from seqpar.bench.adaptive_bench import format_report, run_adaptive_bench

    try:
        result = run_adaptive_bench(
            args.output, config=args.config, overrides=args.overrides, nproc=args.nproc, steps=args.steps,
            seq_len=args.seq_len, tokens_per_step=args.tokens_per_step, capacity_tokens=args.capacity_tokens,
            time_limit=args.time_limit, profile=args.profile, skip_fit=args.skip_fit, predict=not args.no_64,
        )
    except (ValueError, RuntimeError) as e:
        print(f"seqpar: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    print(format_report(result, args.nproc, os.cpu_count(), torch.cuda.is_available()))
    print("wrote " + ", ".join(result.files))
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    import torch

    from seqpar.bench.memory_bench import format_table, run_memory_bench
    from seqpar.config import ConfigError, ModelConfig

    try:
        dim, layers, heads, kv = (int(x) for x in args.model.split(","))
        cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, vocab_size=args.vocab)
        tokens = [int(x) for x in args.tokens.split(",")]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = run_memory_bench(cfg, tokens, [p for p in args.policies.split(",") if p], device, chunk=args.chunk,
                                alpha=args.alpha)
    except (ValueError, ConfigError) as e:
        print(f"seqpar: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, device))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": device.type, "model": args.model, "vocab": args.vocab,
                       "rows": [{"tokens": r.tokens, "policy": r.policy, "measured": r.measured, "estimated": r.estimated,
                                 "error": r.error} for r in rows]}, f, indent=1)
    return 0


def cmd_bench_offload(args: argparse.Namespace) -> int:
    import torch

    from seqpar.bench.offload_bench import format_table, run_offload_bench
    from seqpar.bench.scale_bench import model_config

    try:
        cfg = model_config(args.model, args.vocab)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = run_offload_bench(cfg, [int(x) for x in args.tokens.split(",")], [p for p in args.policies.split(",") if p],
                                 device, steps=args.steps, alpha=args.alpha)
    except ValueError as e:
        print(f"seqpar: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, device, args.alpha))
    if args.json:
        import dataclasses
        import json

        with open(args.json, "w") as f:
            json.dump({"device": device.type, "model": args.model, "vocab": args.vocab, "alpha": args.alpha,
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from seqpar.bench.scale_bench import format_table, model_config, run_scale_bench

    try:
        cfg = model_config(args.model, args.vocab)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        rows = run_scale_bench(args.model, args.vocab, args.world, args.budget_mib,
                               [p for p in args.policies.split(",") if p], args.alpha, args.json, args.resolution)
    except (ValueError, RuntimeError) as e:
        print(f"seqpar: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, cfg, args.world, args.budget_mib * 2**20, args.alpha))
    return 0


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    import time

    import torch

    from seqpar.bench.scaling_bench import gpu_kernel_table, run_scaling_bench
    from seqpar.bench.scaling_report import format_table, make_spec, write_outputs

    cuda = torch.cuda.is_available()
    cores = os.cpu_count()
    try:
        spec = make_spec(args.quick, cuda, args.model, args.vocab, args.degrees, args.lengths, args.algorithms, args.steps,
                         cores)
        start = time.perf_counter()
        rows = run_scaling_bench(spec, progress=lambda line: print(line, file=sys.stderr, flush=True))
        extra = gpu_kernel_table(spec) if cuda else ""
    except (ValueError, RuntimeError) as e:
        print(f"seqpar: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    m = spec.model
    where = torch.cuda.get_device_name(0) if cuda else f"{cores}-core CPU, gloo"
    header = (f"seqpar bench scaling{' --quick' if args.quick else ''} on {where}; model dim {m.dim}, {m.n_layers} layers, "
              f"{m.n_heads}/{m.n_kv_heads} heads, vocab {m.vocab_size}; one step = one stream of 4 documents "
              f"(L/2, L/4, L/8, L/8); times: median of {spec.steps} steps after a warm-up; "
              f"wall {time.perf_counter() - start:.0f} s")
    print(format_table(rows))
    print(header)
    files = write_outputs(rows, args.output, header, cores, spec.max_timed, extra)
    print("wrote " + ", ".join(files))
    return 0


def add_bench_commands(sub) -> None:
    """Register ``seqpar bench data``, ``kernels``, ``adaptive``, ``memory``, ``offload``, ``scale`` and ``scaling``
    on the top-level subparsers."""
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

    p = kinds.add_parser("adaptive", help="adaptive scattering vs every static degree: measured and predicted step time")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every arm, e.g. model.dim=64")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2: on CPU, times mean something at <= 1 rank per core)")
    p.add_argument("--steps", type=int, default=6, help="steps per arm; times are medians over steps >= 2")
    p.add_argument("--config", default="configs/tiny-cpu.yaml", help="config of every arm (its model is also profiled)")
    p.add_argument("--seq-len", type=int, default=1024, help="data.seq_len: longest sequence (varlen)")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--capacity-tokens", type=int, default=0, help="scatter.capacity_tokens K per rank (0: from the profile)")
    p.add_argument("--time-limit", type=float, default=1.0, help="scatter.time_limit_s, the planner's budget per step")
    p.add_argument("--profile", default="", help="use this profile (name or YAML) instead of fitting one")
    p.add_argument("--skip-fit", action="store_true", help="reuse OUTPUT/profile.yaml from an earlier run")
    p.add_argument("--no-64", action="store_true", help="skip the planner's 64-GPU predictions (~30 s of planning)")
    p.add_argument("--output", default="runs/bench-adaptive", help="directory for CSV, PNG, the profile and the arms' run dirs")
    p.set_defaults(func=cmd_bench_adaptive)

    p = kinds.add_parser("memory", help="the memory estimator vs measured peaks, per memory policy and length")
    _memory_bench_args(p, tokens="1024,2048", policies="none,full,selective,offload,memo")
    p.add_argument("--chunk", type=int, default=256, help="memory.loss_chunk_tokens")
    p.set_defaults(func=cmd_bench_memory)

    p = kinds.add_parser("offload", help="step time of offload and memo against selective, and their gradient error")
    _memory_bench_args(p, tokens="2048", policies="selective,offload,memo")
    p.add_argument("--steps", type=int, default=3, help="timed steps per policy and length, after one warm-up step")
    p.set_defaults(func=cmd_bench_offload)

    p = kinds.add_parser("scale", help="longest document that trains one step under a per-rank memory budget, per policy")
    p.add_argument("--model", default="256,8,8,4", help="dim,layers,heads,kv_heads")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--world", type=int, default=4, help="ranks of the ring (gloo processes)")
    p.add_argument("--budget-mib", type=float, default=128, help="peak memory per rank (model states included)")
    p.add_argument("--policies", default="none,full,selective,offload,memo", help="comma-separated memory policies")
    p.add_argument("--alpha", type=float, default=0.0, help="memo's alpha (0: recompute every token-local op)")
    p.add_argument("--resolution", type=float, default=0.05,
                   help="stop when the longest fitting and the shortest failing length are this close (relative)")
    p.add_argument("--json", default="runs/bench-scale/scale.json", help="where the rows go")
    p.set_defaults(func=cmd_bench_scale)

    p = kinds.add_parser("scaling", help="ring, Ulysses, hybrid and adaptive by SP degree and length: time, memory, bytes")
    p.add_argument("--quick", action="store_true", help="a small model and two lengths (< 1 min on 2 cores; the tests)")
    p.add_argument("--output", default="runs/bench-scaling", help="directory for scaling.csv, scaling.md and the PNGs")
    p.add_argument("--model", default="", help="dim,layers,heads,kv_heads (default: 128,4,8,4; --quick 64,2,8,4)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary (default 512 on CPU)")
    p.add_argument("--degrees", default="", help="SP degrees, powers of two >= 2 (default 2,4,8; --quick 2,4)")
    p.add_argument("--lengths", default="", help="tokens per step (default 1024,2048,4096,8192; --quick 256,512)")
    p.add_argument("--algorithms", default="", help="subset of ring,ulysses,hybrid,adaptive (default: all)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per row, median (default 3; --quick 2)")
    p.set_defaults(func=cmd_bench_scaling)


def _memory_bench_args(p: argparse.ArgumentParser, tokens: str, policies: str) -> None:
    """The arguments `bench memory` and `bench offload` share: model, lengths, policies, alpha, JSON."""
    p.add_argument("--model", default="128,4,4,2", help="dim,layers,heads,kv_heads (default: the tiny-cpu model)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--tokens", default=tokens, help="comma-separated tokens of the one-document micro-batch")
    p.add_argument("--policies", default=policies, help="comma-separated memory policies")
    p.add_argument("--alpha", type=float, default=0.5, help="memo's alpha (share of tokens kept, not recomputed)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
