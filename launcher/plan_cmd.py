"""``seqpar plan`` (adaptive-scattering planner and simulator) and ``seqpar profile``.

    seqpar plan --dist wikipedia --world 64 --profile A100-40GB --model gpt-7b
    seqpar plan --lengths lengths.txt --world 16 --profile A100-40GB --json | jq .
    seqpar plan --dist github --world 64 --profile A100-40GB --deterministic   # same output on any machine
    seqpar plan --store embedded --world 64 --profile A100-40GB --steps 4
    seqpar plan --dist github --world 64 --profile H100-SXM --model configs/llama-7b-1m.yaml --memory none,selective
    seqpar profile --output my-cluster.yaml                # or under torchrun for bandwidths

``plan`` prints the plan of the first step, the predicted step time, memory per rank, the lower
bound and gap, the solve time, and the same for each baseline (best static degree,
batch-adaptive, greedy) with the planner's speedup over it; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def _error(msg: str) -> int:
    print(f"seqpar: error: {msg}", file=sys.stderr)
    return 2


def _batches(args: argparse.Namespace) -> tuple[list, str]:
    import numpy as np

    from seqpar.scatter.workloads import read_lengths, sample_batches, synthetic_lengths

    if args.lengths:
        lengths = read_lengths(args.lengths)
        if args.batch_size and lengths.size > args.batch_size:
            return sample_batches(lengths, args.batch_size, args.steps, args.seed), f"{args.lengths} (sampled)"
        return [lengths], args.lengths
    if args.dist:
        bs = args.batch_size or 512
        return [synthetic_lengths(args.dist, bs, args.seed + k, args.max_len) for k in range(args.steps)], f"--dist {args.dist}"
    from seqpar.data.store import TokenStore

    prefix = args.store
    if prefix == "embedded":
        from seqpar.data.corpus import embedded_corpus

        prefix = embedded_corpus(progress=False)
    lengths = np.asarray(TokenStore(prefix).doc_lengths, dtype=np.int64)
    if args.max_len:
        lengths = np.minimum(lengths, args.max_len)
    return sample_batches(lengths, args.batch_size or 512, args.steps, args.seed), f"store {prefix}"


def run_plan(args: argparse.Namespace) -> dict:
    """Plan every batch, run the baselines on the same batches; returns the JSON object."""
    from seqpar.hardware import load_profile
    from seqpar.scatter.baselines import compare
    from seqpar.scatter.costmodel import build_cost_model
    from seqpar.scatter.planner import PlannerOptions
    from seqpar.scatter.workloads import resolve_model

    if args.world < 1:
        raise ValueError(f"--world={args.world} must be >= 1")
    # --deterministic keeps only the closed-form bound unless --bound-time asks for the (timed) MILP bound
    bound_time = args.bound_time if args.bound_time is not None else (0.0 if args.deterministic else 4.0)
    if bound_time < 0 or args.time_limit < 0:
        raise ValueError(f"--time-limit={args.time_limit} and --bound-time={bound_time} must be >= 0 seconds")
    profile, model = load_profile(args.profile), resolve_model(args.model)
    cm = build_cost_model(profile, model, args.world)
    batches, source = _batches(args)
    opts = PlannerOptions(buckets=args.buckets, allow_degree1=not args.no_degree1, all_busy=not args.allow_idle,
                          time_limit_s=None if args.deterministic else args.time_limit, bound_time_s=bound_time)
    policies = [p.strip() for p in args.memory.split(",") if p.strip()] if args.memory else []
    if len(policies) > 1:
        per = {}
        for policy in policies:
            sub = argparse.Namespace(**{**vars(args), "memory": policy})
            per[policy] = run_plan(sub)
        return {"memory_policies": per}
    if policies:
        cm = _estimated(cm, profile, model, policies[0], args.alpha)
    r = compare(cm, batches, opts)
    first = r["results"][0]
    max_tok = max(x.max_tokens_per_rank for x in r["results"])
    out = {
        "source": source, "world": args.world, "profile": args.profile, "model": args.model,
        "steps": len(batches), "sequences_per_step": [int(len(b)) for b in batches],
        "tokens_per_step": [int(sum(int(s) for s in b)) for b in batches],
        "max_length": int(max(int(max(b)) for b in batches)), "capacity_tokens_per_rank": cm.capacity,
        "capacity_from": f"memory estimator, --memory {policies[0]}" if policies else "profile activation bytes per token",
        "predicted_step_s": r["predicted_step_s"], "lower_bound_s": r["lower_bound_s"], "gap": r["gap"],
        "solve_s": r["solve_s"], "solve_cpu_s": r["solve_cpu_s"], "heuristic_s": r["heuristic_s"],
        "bound_s": r["bound_s"],
        "num_microbatches": first.plan.num_microbatches,
        "method": first.method, "max_tokens_per_rank": max_tok,
        "memory_per_rank_gib": cm.memory_per_rank(max_tok) / 2**30,
        "per_step_s": [x.predicted_step_s for x in r["results"]],
        "plan": first.plan.to_dict(),
        "baselines": r["baselines"],
    }
    return out


def _estimated(cm, profile, model, policy: str, alpha: float = 1.0):
    """The cost model with K from the memory estimator under ``policy`` (FSDP over the pool; bf16
    and fused attention on GPU profiles, fp32 and the reference kernel on the CPU profile; memo with
    ``alpha``)."""
    from seqpar.config import MEMORY_POLICIES
    from seqpar.scatter.capacity import capacity_tokens

    if policy not in MEMORY_POLICIES:
        raise ValueError(f"--memory {policy!r}: choose among {', '.join(MEMORY_POLICIES)} (comma-separated to compare)")
    cpu = profile.name.startswith("cpu")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha={alpha} must be in [0, 1]")
    return capacity_tokens(cm, model, policy, "fp32" if cpu else "bf16", "reference" if cpu else "flash", alpha=alpha)


def format_policies(out: dict) -> str:
    """``--memory a,b``: K and the resulting plan of each policy, side by side."""
    per = out["memory_policies"]
    first = next(iter(per.values()))
    lines = [
        f"seqpar plan: {first['source']}, {first['steps']} step(s) of {first['sequences_per_step'][0]} sequences "
        f"(~{first['tokens_per_step'][0]:,} tokens, max {first['max_length']:,}) on {first['world']} x {first['profile']}, "
        f"model {first['model']}; K from the memory estimator per policy",
        f"{'memory policy':<14} {'K tokens/rank':>14} {'planner s/step':>15} {'micro-batches':>14} {'memory/rank':>12}  "
        "groups of micro-batch 0 (count x degree)",
    ]
    from seqpar.scatter.plan import Plan

    for policy, o in per.items():
        mb = Plan.from_dict(o["plan"]).micro_batches[0]
        lines.append(f"{policy:<14} {o['capacity_tokens_per_rank']:>14,} {o['predicted_step_s']:>15.2f} "
                     f"{o['num_microbatches']:>14} {o['memory_per_rank_gib']:>8.1f} GiB  {_groups_line(mb)}")
    lines.append("a policy that frees memory raises K, so the planner can use smaller groups (less communication)")
    return "\n".join(lines)


def _groups_line(mb) -> str:
    counts: dict[tuple[int, str], list[int]] = {}
    for g in mb.groups:
        counts.setdefault((g.degree, g.algorithm), []).append(len(g.seq_ids))
    parts = [f"{len(v)}x{d}({a}, {sum(v)} seq)" for (d, a), v in sorted(counts.items(), key=lambda kv: -kv[0][0])]
    return " ".join(parts)


def format_plan(out: dict) -> str:
    from seqpar.scatter.plan import Plan

    b = out["baselines"]
    pred = out["predicted_step_s"]
    lines = [
        f"seqpar plan: {out['source']}, {out['steps']} step(s) of {out['sequences_per_step'][0]} sequences "
        f"(~{out['tokens_per_step'][0]:,} tokens, max {out['max_length']:,}) on {out['world']} x {out['profile']}, "
        f"model {out['model']}, K = {out['capacity_tokens_per_rank']:,} tokens/rank ({out['capacity_from']})",
        f"planner         {pred:9.2f} s/step  bound {out['lower_bound_s']:.2f} s  gap {100 * out['gap']:.1f}%  "
        f"solve {out['solve_s']:.2f} s (cpu {out['solve_cpu_s']:.2f} s, bound {out['bound_s']:.2f} s)  micro-batches {out['num_microbatches']}  "
        f"memory/rank {out['memory_per_rank_gib']:.1f} GiB ({out['max_tokens_per_rank']:,.0f} tokens)",
        f"static best     {b['static_best']['predicted_step_s']:9.2f} s/step  (degree {b['static_best']['degree']}, "
        f"{b['static_best']['algorithm']})  planner speedup {b['static_best']['speedup']:.2f}x",
        f"batch-adaptive  {b['batch_adaptive']['predicted_step_s']:9.2f} s/step  (degrees {b['batch_adaptive']['degrees']})  "
        f"planner speedup {b['batch_adaptive']['speedup']:.2f}x",
        f"greedy          {b['greedy']['predicted_step_s']:9.2f} s/step  gap {100 * b['greedy']['gap']:.1f}%  "
        f"planner speedup {b['greedy']['speedup']:.2f}x",
        "plan of step 1 (micro-batch: seconds, groups as count x degree):",
    ]
    plan = Plan.from_dict(out["plan"])
    for k, (mb, t) in enumerate(zip(plan.micro_batches, plan.micro_batch_s)):
        lines.append(f"  mb {k:2d}  {t:7.2f} s  {_groups_line(mb)}")
    return "\n".join(lines)


def _strict(obj):
    """obj with every non-finite float replaced by None (and numpy scalars made plain)."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def cmd_plan(args: argparse.Namespace) -> int:
    from seqpar.data.store import StoreError
    from seqpar.scatter.costmodel import CostModelError
    from seqpar.scatter.plan import PlanError

    try:
        out = run_plan(args)
    except (PlanError, CostModelError, StoreError, ValueError, FileNotFoundError) as e:
        return _error(str(e))
    # Strict JSON (jq and most parsers reject NaN/Infinity): a non-finite number becomes null.
    text = format_policies(out) if "memory_policies" in out else format_plan(out)
    print(json.dumps(_strict(out), allow_nan=False) if args.json else text, flush=True)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from seqpar.scatter.profiler import run_profile

    try:
        path = run_profile(args)
    except (ValueError, RuntimeError) as e:
        return _error(str(e))
    if path:
        print(f"wrote {path}")
    return 0


def add_plan_commands(sub) -> None:
    """Register ``seqpar plan`` and ``seqpar profile`` on the top-level subparsers."""
    from seqpar.scatter.workloads import FAMILIES, MODEL_PRESETS

    p = sub.add_parser("plan", help="plan adaptive sequence-parallel groups for a batch and compare with baselines")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lengths", default="", help="file with one sequence length (tokens) per line")
    src.add_argument("--dist", default="", choices=FAMILIES, help="synthetic long-tail family")
    src.add_argument("--store", default="", help="token store prefix (PREFIX.bin/.idx), or 'embedded' for the built-in corpus")
    p.add_argument("--world", type=int, required=True, help="ranks (GPUs)")
    p.add_argument("--profile", required=True, help="hardware profile name (cluster/profiles) or YAML path")
    p.add_argument("--model", default="gpt-7b", help=f"model preset ({', '.join(MODEL_PRESETS)}) or a config YAML path")
    p.add_argument("--memory", default="",
                   help="memory policy (none, full, selective, offload, memo) whose estimated peak sets K, the tokens per rank; "
                        "comma-separated to compare policies side by side (default: the profile's activation bytes per token)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="memo: share of each rank's tokens whose token-local tensors are kept (default 0.5, ByteScale's "
                        "offload ratio; training solves MEMO's LP instead)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per step (default 512; --lengths: the whole file)")
    p.add_argument("--steps", type=int, default=1, help="steps (batches) to plan; static best picks one degree for all")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic lengths / sampling")
    p.add_argument("--max-len", type=int, default=196_608, help="clip lengths of --dist/--store to this (default 192K)")
    p.add_argument("--buckets", type=int, default=16, help="initial number of length buckets of the MILP")
    p.add_argument("--time-limit", type=float, default=1.0, help="planner wall-clock seconds per step (the first level build always completes)")
    p.add_argument("--bound-time", type=float, default=None,
                   help="HiGHS seconds per step for the level-MILP lower bound, after the plan and not in solve time "
                        "(default 4; 0: closed form only, the default with --deterministic)")
    p.add_argument("--deterministic", action="store_true",
                   help="no wall-clock limits: every level build and search runs to its end and the MILPs stop at a "
                        "node limit, so the plan depends only on the inputs (slower; the bound is the closed form unless "
                        "--bound-time is given)")
    p.add_argument("--no-degree1", action="store_true", help="forbid groups of one rank")
    p.add_argument("--allow-idle", action="store_true", help="let ranks idle in a micro-batch (default: all ranks busy)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("profile", help="fit cost-model constants on this device (and bandwidths under torchrun)")
    p.add_argument("--output", default="",
                   help="profile YAML to write (default: this device's fit in $SEQPAR_CACHE/profiles, which "
                        "scatter.profile=auto uses)")
    p.add_argument("--base", default="", help="profile to start from (name or path); default: detected or cpu")
    p.add_argument("--model", default="", help="model preset or config YAML to time (default: a small model)")
    p.add_argument("--lengths", default="256,512,1024,2048", help="comma-separated lengths to time")
    p.set_defaults(func=cmd_profile)
