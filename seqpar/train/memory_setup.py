"""Start-up wiring of the offloading memory policies (``memory.policy: offload | memo``): memo's alpha
from MEMO's LP on measured numbers, and the transfer engine for this rank's device. The model code
never chooses either; the trainer injects them (``default_model_policies``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from seqpar.config import Config, ModelConfig
from seqpar.memory.estimate import MemoryLayout, layer_bytes
from seqpar.memory.transfer import HostEngine, ScheduledEngine

_GIB = 2**30


def host_budget_bytes(cfg: Config, local_world: int) -> float:
    """``memory.host_budget_gib`` per rank, or this machine's available memory over its local ranks."""
    if cfg.memory.host_budget_gib > 0:
        return cfg.memory.host_budget_gib * _GIB
    from seqpar.scatter.capacity import host_memory_gib

    return host_memory_gib() * _GIB / max(local_world, 1)


def solve_memo_alpha(cfg: Config, model_cfg: ModelConfig, layout: MemoryLayout, tokens: int, device: torch.device,
                     dtype: torch.dtype, local_world: int, group: dist.ProcessGroup | None = None) -> tuple[float, str]:
    """``memory.alpha: auto``: measure one block's forward at ``tokens`` rows and the device-to-host
    bandwidth on this rank, solve MEMO's LP, and agree on the smallest alpha over ``group`` (collective
    when it has more than one rank). Returns (alpha, the line for the log)."""
    from seqpar.attention import build_attention
    from seqpar.memory.alpha import alpha_problem, format_solution, measure_forward_s, measure_host_bandwidth, solve_alpha
    from seqpar.model.llama import Block

    block = Block(model_cfg, build_attention(cfg.kernels.attention, device)).to(device=device, dtype=dtype)
    forward_s = measure_forward_s(block, model_cfg, tokens, device, dtype)
    del block
    problem = alpha_problem(model_cfg, layout, tokens, forward_s, measure_host_bandwidth(device),
                            host_budget_bytes(cfg, local_world))
    solution = solve_alpha(problem)  # ValueError (one line) when the host budget cannot hold memo at all
    alpha = solution.alpha
    if group is not None and dist.get_world_size(group) > 1:  # every rank splits its tokens alike
        t = torch.tensor([alpha], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        alpha = float(t.item())  # start-up, not the step
    line = format_solution(problem, solution, f"MEMO's LP on measured numbers at {tokens:,} tokens per rank")
    if alpha != solution.alpha:
        line += f"; {alpha:.3f}, the smallest over the ranks"
    return alpha, line


def slab_bytes(model_cfg: ModelConfig, policy: str, layout: MemoryLayout, tokens: int) -> int:
    """Pinned bytes per offloaded block for ``tokens`` local tokens: the estimator's saved bytes per
    block, plus the RoPE tables (moved once, with the first offloaded block) and alignment slack."""
    per_block = layer_bytes(model_cfg, policy, layout).saved * tokens
    return int(per_block * 1.02 + 2 * 4 * tokens * model_cfg.head_dim // 2 + (1 << 20))


def build_engine(cfg: Config, model_cfg: ModelConfig, layout: MemoryLayout, tokens: int,
                 device: torch.device) -> ScheduledEngine:
    """The transfer engine for ``memory.policy`` offload / memo on ``device``: pinned slabs and
    streams on CUDA (sized for ``tokens`` local tokens), the host engine elsewhere."""
    if device.type != "cuda":
        return HostEngine(cfg.memory.depth)
    from seqpar.memory.cuda_engine import CudaEngine

    layout = dataclasses.replace(layout, keep_last=cfg.memory.keep_last)
    offloaded = max(0, model_cfg.n_layers - cfg.memory.keep_last)
    return CudaEngine(device, offloaded, slab_bytes(model_cfg, cfg.memory.policy, layout, tokens), cfg.memory.depth)
