"""Fully sharded data parallelism (FSDP2) over the flattened dp x sp mesh."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Shard each transformer block, then the root (embeddings, final norm, head), over ``mesh``.

    mesh: 1-D mesh of all dp x sp ranks; every rank of an SP group holds a different shard of
    the same sequences, so gradients are reduced over sp as well as dp. param_dtype: compute
    dtype of the gathered parameters (bf16 on CUDA), None keeps fp32. Gradients are **summed**,
    not averaged, because the loss is already normalised by the global token count.
    """
    # cast_forward_inputs=False: a block's floating inputs include the fp32 RoPE tables, which FSDP
    # would otherwise cast to bf16 per block (a bf16 copy saved by every layer, and RoPE angles at
    # long positions rounded to bf16). The residual stream is already in param_dtype (the embedding's
    # output), so nothing else needs the cast.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # Gloo has no PREMUL_SUM; a plain SUM is what a divide factor of 1 means anyway.
            m.set_force_sum_reduction_for_comms(True)
    return model
