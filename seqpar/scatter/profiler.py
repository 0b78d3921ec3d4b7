"""``seqpar profile``: fit the cost model's constants on the current machine and write a profile.

    seqpar profile --output my.yaml --base A100-40GB --model llama-1b         # compute only
    seqpar profile --model configs/tiny-cpu.yaml      # no --output: this device's fit, used by scatter.profile=auto
    torchrun --nproc_per_node 4 -m seqpar.launcher profile --output my.yaml    # + bandwidths (gloo/NCCL)

Compute: forward + backward of one sequence of each length (``--lengths``) on this device, then
least squares (non-negative) of T(s) = a1 s^2 + a2 s + b1, so a1, a2, b1 describe *this* model
(written as ``reference_model``; the cost model rescales them by FLOPs for other models).
Bandwidths (only with WORLD_SIZE > 1): for every power-of-two degree d, all-to-alls inside the
aligned groups of d consecutive ranks at a few sizes, fitted as T = bytes / v + latency (v is
bytes each rank sends per second, the spec's v_d; the latency becomes b2); P2P ping-pong
between rank 0 and its neighbour (intra-node) and rank 0 and the first rank of the next node
(inter-node, when the world spans nodes). The fits are pure functions, unit-tested; the
measuring parts run torch and are collective where they say so.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import yaml
from scipy.optimize import nnls


def fit_compute(lengths, seconds) -> tuple[float, float, float]:
    """Non-negative least squares of seconds = a1 s^2 + a2 s + b1; returns (a1, a2, b1) in s/token^2, s/token, s."""
    s = np.asarray(lengths, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if s.size < 3:
        raise ValueError(f"need at least 3 lengths to fit a1, a2, b1, got {s.size}; pass more with --lengths")
    scale = np.array([s.max() ** 2, s.max(), 1.0])  # condition the columns
    coef, _ = nnls(np.stack([s * s, s, np.ones_like(s)], axis=1) / scale, t)
    a1, a2, b1 = coef / scale
    return float(a1), float(a2), float(b1)


def fit_bandwidth(nbytes, seconds) -> tuple[float, float]:
    """Least squares of seconds = bytes / v + latency; returns (v bytes/s, latency s), both >= 0."""
    x = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    coef, _ = nnls(np.stack([x, np.ones_like(x)], axis=1) / np.array([x.max(), 1.0]), t)
    inv_v, lat = coef[0] / x.max(), coef[1]
    if inv_v <= 0:  # time did not grow with size: report the best observed rate
        return float(np.max(x / np.maximum(t, 1e-12))), float(lat)
    return float(1.0 / inv_v), float(lat)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_compute(model_cfg, lengths, device, repeats: int = 2) -> list[float]:
    """Seconds of forward + backward of one sequence per length (best of ``repeats`` after a warm-up)."""
    import torch

    from seqpar.attention import build_attention
    from seqpar.attention.context import AttnContext
    from seqpar.model.llama import Transformer

    cfg = model_cfg
    if cfg.vocab_size <= 0:
        from dataclasses import replace

        cfg = replace(cfg, vocab_size=256)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Transformer(cfg, attention=build_attention("auto", device)).to(device=device, dtype=dtype)
    out = []
    for s in lengths:
        tokens = torch.randint(0, cfg.vocab_size, (s,), device=device)
        pos = torch.arange(s, dtype=torch.int32, device=device)
        # host_cu as the trainer passes it: a whole document takes the CPU fast path, as degree-1 groups do
        ctx = AttnContext(positions=pos, doc_ids=torch.zeros(s, dtype=torch.int32, device=device),
                          cu_seqlens=torch.tensor([0, s], dtype=torch.int32, device=device),
                          host_cu=np.array([0, s], dtype=np.int64))
        best = float("inf")
        for r in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(tokens, ctx).float().sum().backward()
            _sync(device)
            if r:  # the first run is a warm-up
                best = min(best, time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        out.append(best)
    return out


def measure_alltoall(world: int, rank: int, device, sizes=(1 << 16, 1 << 18, 1 << 20)) -> dict[int, tuple[float, float]]:
    """{degree: (bytes/s per rank, latency s)} for all-to-alls in aligned groups of consecutive ranks.

    Collective over the world: every rank builds the pool of these groups (the core creates no
    group itself) and takes part in its own.
    """
    import torch
    import torch.distributed as dist

    from seqpar.parallel.pool import GroupPool, adaptive_shapes

    pool = GroupPool.build([s for s in adaptive_shapes(world) if s.degree >= 2 and s.ulysses == s.degree])
    out = {}
    d = 2
    while d <= world:
        first = rank - rank % d
        mine = pool.get(first, d, d).sp if first + d <= world else None
        xs, ts = [], []
        for n in sizes:  # n float32 elements sent in total per rank
            n -= n % d
            x = torch.ones(n, dtype=torch.float32, device=device)
            y = torch.empty_like(x)
            best = float("inf")
            for _ in range(3):
                dist.barrier()
                _sync(device)
                t0 = time.perf_counter()
                if mine is not None:
                    dist.all_to_all_single(y, x, group=mine)
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            t = torch.tensor([best], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest group sets the rate
            xs.append(n * 4 * (d - 1) / d)
            ts.append(float(t.item()))
        out[d] = fit_bandwidth(xs, ts)
        d *= 2
    return out


def measure_p2p(world: int, rank: int, device, peer_of_0: int, sizes=(1 << 16, 1 << 20)) -> tuple[float, float]:
    """(bytes/s, latency s) of one link between rank 0 and ``peer_of_0`` (ping-pong; collective: barriers)."""
    import torch
    import torch.distributed as dist

    xs, ts = [], []
    for n in sizes:
        x = torch.ones(n, dtype=torch.float32, device=device)
        best = float("inf")
        for _ in range(3):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(x, peer_of_0)
                dist.recv(x, peer_of_0)
            elif rank == peer_of_0:
                dist.recv(x, 0)
                dist.send(x, 0)
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / 2)
        xs.append(n * 4)
        ts.append(best)
    return fit_bandwidth(xs, ts)


def run_profile(args: Any) -> str | None:
    """Measure and write the profile YAML (rank 0 writes; returns its path there, None elsewhere)."""
    import torch

    from seqpar.hardware import detect_profile_name, load_profile
    from seqpar.scatter.workloads import resolve_model

    lengths = [int(x) for x in str(args.lengths).split(",") if x.strip()]
    if len(lengths) < 3 or min(lengths) < 1:
        raise ValueError(f"--lengths={args.lengths!r} needs at least 3 positive lengths, e.g. 256,512,1024,2048")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    base_name = args.base or detect_profile_name(device) or "cpu"
    base = load_profile(base_name)
    with open(base.source) as f:
        data = yaml.safe_load(f)
    model = resolve_model(args.model) if args.model else None
    if model is None:
        from seqpar.config import ModelConfig

        model = ModelConfig(dim=256, n_layers=2, n_heads=4, vocab_size=256)
    if model.vocab_size <= 0:  # what measure_compute times (the constants must describe that model)
        from dataclasses import replace

        model = replace(model, vocab_size=256)
    if world > 1:
        from seqpar.parallel.init import init_distributed

        init_distributed()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        a2a = measure_alltoall(world, rank, device)
        intra = measure_p2p(world, rank, device, 1)
        inter = measure_p2p(world, rank, device, per_node) if per_node < world else None
        data["gpus_per_node"] = per_node
        data["alltoall_bw_gbps"] = {d: round(v / 1e9, 4) for d, (v, _) in a2a.items()}
        data["p2p_bw_gbps"] = {"intra_node": round(intra[0] / 1e9, 4),
                               "inter_node": round((inter or intra)[0] / 1e9, 4)}
    times = measure_compute(model, lengths, device) if rank == 0 else []
    if rank != 0:
        return None
    a1, a2, b1 = fit_compute(lengths, times)
    sc = dict(data.get("scatter_compute") or {})
    sc.update({
        "reference_model": {k: getattr(model, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")},
        "a1_ms_per_token2": a1 * 1e3, "a2_ms_per_token": a2 * 1e3, "b1_ms": b1 * 1e3,
        "measured_lengths": lengths, "measured_s": [round(t, 6) for t in times],
    })
    if world > 1:
        sc["b2_ms"] = round(1e3 * max(lat for _, lat in a2a.values()), 6)
    sc.setdefault("activation_bytes_per_token", 4.5e6)
    data["scatter_compute"] = sc
    data["name"] = f"{data.get('name', base_name)}-measured"
    data["description"] = f"measured by seqpar profile on {device.type} ({world} rank(s)) from {base_name}"
    output = args.output
    if not output:  # where `scatter.profile: auto` looks for this device's fit
        from seqpar.scatter.capacity import fitted_profile_path

        output = fitted_profile_path(detect_profile_name(device) or base_name)
        os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        f.write("# Written by `seqpar profile`; see seqpar/scatter/profiler.py for what each number is.\n")
        yaml.safe_dump(data, f, sort_keys=False)
    return output
