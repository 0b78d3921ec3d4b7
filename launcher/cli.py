"""The ``seqpar`` command.

    seqpar train configs/tiny-cpu.yaml --nproc 2            # torchrun --standalone, 2 ranks
    seqpar train configs/tiny-cpu.yaml train.steps=10 --print-cmd
    seqpar train configs/llama-1b-128k.yaml --dry-run --world-size 8   # validate the layout, launch nothing
    seqpar train configs/tiny-cpu.yaml --launcher mpi --nproc 2           # mpiexec instead of torchrun
    seqpar submit configs/tiny-cpu.yaml --nodes 1 --nproc-per-node 2 --gpus-per-node 0 --time 10   # Slurm
    seqpar data prepare corpus/ notes.jsonl --output data/mystore
    seqpar data decompose data/mystore --min-log2 8 --max-log2 13 --output data/mystore-dd
"""

from __future__ import annotations

import argparse
import os
import sys


def _error(msg: str) -> int:
    print(f"seqpar: error: {msg}", file=sys.stderr)
    return 2


def _default_nproc(cfg) -> int:
    if cfg.parallel.dp > 0:
        return cfg.parallel.dp * cfg.parallel.sp
    import torch

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(n_gpu, cfg.parallel.sp, 1)


def cmd_train(args: argparse.Namespace) -> int:
    from seqpar.config import ConfigError, load_config
    from seqpar.data.store import StoreError
    from seqpar.launcher.torchrun import format_cmd, torchrun_cmd
    from seqpar.parallel.dims import ParallelDimsError

    try:
        cfg = load_config(args.config, args.overrides)
        if args.nproc is not None and args.nproc < 1:
            raise ValueError(f"--nproc {args.nproc} must be >= 1 (leave it out for dp x sp from the config)")
        if args.nnodes < 1:
            raise ValueError(f"--nnodes={args.nnodes} must be >= 1")
        if args.nnodes > 1 and not args.rdzv_endpoint:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        nproc = args.nproc or max(1, _default_nproc(cfg) // args.nnodes)
        world = nproc * args.nnodes
        env = dict(os.environ)
        # torchrun otherwise warns and sets 1 thread per rank; make the CPU split explicit instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        if args.dry_run:
            from seqpar.train.dry_run import dry_run_report

            report = dry_run_report(cfg, args.world_size or world)
        else:
            cfg.parallel_dims(world)  # the trainer's own validation, before any process starts
            from seqpar.train.data_setup import check_data_path

            check_data_path(cfg)
            if cfg.adaptive:  # the pool must hold data.seq_len; the profile must exist
                import torch

                from seqpar.scatter.capacity import run_cost_model

                run_cost_model(cfg, world, torch.device("cuda" if torch.cuda.is_available() else "cpu"), nproc)
        if args.launcher == "mpi":
            from seqpar.launcher.mpi import detect_flavor, find_mpiexec, mpiexec_cmd, mpiexec_version

            if args.nnodes > 1:
                raise ValueError("--launcher mpi takes --hosts, not --nnodes (--nproc counts ranks in all)")
            mpiexec = find_mpiexec()
            cmd = mpiexec_cmd(args.config, args.overrides, nproc, flavor=detect_flavor(mpiexec_version(mpiexec)),
                              hosts=args.hosts, env=env, as_root=os.geteuid() == 0, mpiexec=mpiexec)
        else:
            if args.hosts:
                raise ValueError("--hosts goes with --launcher mpi; torchrun takes --nnodes and --rdzv-endpoint")
            cmd = torchrun_cmd(
                args.config, args.overrides, nproc, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id
            )
    except (ConfigError, ParallelDimsError, StoreError, ValueError) as e:
        return _error(str(e))
    if args.dry_run:
        print(report, flush=True)
        return 0
    print(format_cmd(cmd), flush=True)
    if args.print_cmd:
        return 0
    from seqpar.launcher.forward import run_forwarding_signals

    if args.launcher == "torchrun":  # the same torchrun, without its report after a rank's one-line error
        cmd = [cmd[0], "-m", "seqpar.launcher.torchrun_quiet", *cmd[3:]]
    return run_forwarding_signals(cmd, env)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from seqpar.data.prepare import prepare
    from seqpar.data.store import StoreError

    exts = tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",")) if args.extensions else None
    try:
        from seqpar.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, eot_id=args.eot_id, eot_token=args.eot_token or None)
        stats = prepare(
            args.inputs,
            args.output,
            tokenizer,
            jsonl_key=args.jsonl_key,
            append_eot=not args.no_eot,
            extensions=exts,
            progress=not args.quiet,
        )
    except (StoreError, ValueError, FileNotFoundError) as e:
        return _error(str(e))
    eot = f"{tokenizer.eot_token!r} (id {tokenizer.eot_id}, {tokenizer.eot_source})" if hasattr(tokenizer, "eot_source") \
        else f"id {tokenizer.eot_id} (byte tokenizer)"
    print(f"wrote {stats['output']}.bin/.idx: {stats['num_docs']:,} documents, {stats['num_tokens']:,} tokens; "
          f"end-of-text {eot}{'' if not args.no_eot else ', not appended (--no-eot)'}")
    return 0


def cmd_data_decompose(args: argparse.Namespace) -> int:
    from seqpar.data.decompose import decompose_store, format_summary
    from seqpar.data.store import StoreError

    try:
        manifest = decompose_store(
            args.store,
            args.output,
            min_log2=args.min_log2,
            max_log2=args.max_log2,
            overlap=not args.no_overlap,
            randomize=not args.no_randomize,
            seed=args.seed,
            progress=not args.quiet,
        )
    except (StoreError, ValueError) as e:
        return _error(str(e))
    print(f"wrote {args.output}/bucket_*.bin/.idx and manifest.json from {args.store}:")
    print(format_summary(manifest))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpar", description="Distributed long-sequence training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (runs torchrun --standalone)")
    p.add_argument("config", help="YAML config, e.g. configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 parallel.dp=2")
    p.add_argument("--nproc", type=int, default=None, help="processes on this node (default: dp x sp from the config, else GPUs or 1)")
    p.add_argument("--print-cmd", action="store_true", help="print the torchrun (or mpiexec) command and exit")
    p.add_argument("--launcher", choices=("torchrun", "mpi"), default="torchrun",
                   help="torchrun (default) or mpi: mpiexec starts the ranks (MPICH or Open MPI; pip install -e '.[mpi]')")
    p.add_argument("--hosts", default="", help="--launcher mpi: comma-separated hosts (default: this one)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node run (run the same command on each)")
    p.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the c10d rendezvous (multi-node), e.g. node0:29400")
    p.add_argument("--rdzv-id", default="seqpar", help="rendezvous id shared by the nodes of one job")
    p.add_argument("--dry-run", action="store_true", help="validate the layout, print mesh, batch, model and memory, launch nothing")
    p.add_argument("--world-size", type=int, default=0, help="ranks for --dry-run (default: --nproc, else as for launching)")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize text files, directories or JSONL into a Megatron indexed store")
    p.add_argument("inputs", nargs="+", help="text files (one document each), directories, .jsonl files (one document per line)")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a local tokenizer.json")
    p.add_argument("--jsonl-key", default="text", help="JSONL field that holds the text (default: text)")
    p.add_argument("--extensions", default="", help="only files with these endings in directories, e.g. py,md")
    p.add_argument("--no-eot", action="store_true", help="do not append the end-of-text token to documents")
    p.add_argument("--eot-token", default="", help="end-of-text token (default: the tokenizer's eos_token from "
                   "tokenizer_config.json or config.json, else the first of <|endoftext|>, </s>, <|end_of_text|>, <eos>)")
    p.add_argument("--eot-id", type=int, default=None, help="end-of-text id (overrides --eot-token)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("decompose", help="split a store's documents into power-of-two length buckets (dataset decomposition)")
    p.add_argument("store", help="token store prefix (PREFIX.bin/.idx) from `seqpar data prepare` or Megatron")
    p.add_argument("--output", required=True, help="output directory: bucket_KK.bin/.idx per bucket and manifest.json")
    p.add_argument("--min-log2", type=int, default=8, help="shortest bucket 2^k targets; shorter remainders are dropped (default 8)")
    p.add_argument("--max-log2", type=int, default=13, help="longest bucket 2^k targets (default 13 = 8K)")
    p.add_argument("--no-randomize", action="store_true", help="cut too-long remainders at 2^max instead of a random bucket")
    p.add_argument("--no-overlap", action="store_true", help="released scripts' behaviour: pieces do not share a token (loses one target per cut)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random bucket draws (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_decompose)

    from seqpar.launcher.bench_cmd import add_bench_commands  # seqpar bench data
    from seqpar.launcher.plan_cmd import add_plan_commands  # seqpar plan, seqpar profile
    from seqpar.launcher.export_cmd import add_export_commands  # seqpar export hf
    from seqpar.launcher.submit_cmd import add_submit_command  # seqpar submit (Slurm)

    add_plan_commands(sub)
    add_bench_commands(sub)
    add_submit_command(sub)
    add_export_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (seqpar train CFG --nproc 2 train.steps=5): argparse leaves
    # those as unknown arguments, so collect them here.
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    rest = [e for e in extra if e not in overrides]
    if rest or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
