"""Choose a block-attention implementation from the config value.

Config: kernels.attention = auto | triton | reference. Layers never name an
implementation themselves; they pass the config string through resolve_impl.
"""

from __future__ import annotations

from typing import Callable

import torch

from seqpar.kernels import reference

CHOICES = ("auto", "triton", "reference")

FwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _check_name(name: str) -> None:
    if name not in CHOICES:
        raise ValueError(f"kernels.attention={name!r} is not one of {', '.join(CHOICES)}")


def resolve_impl(name: str, device: torch.device | str) -> str:
    """Map a config value to a concrete implementation name for tensors on device.

    Returns "reference" today. auto stays on the torch reference for CUDA as
    well until the Triton kernel is added; at that point auto selects "triton"
    on CUDA and keeps "reference" elsewhere.
    """
    _check_name(name)
    if name == "triton":
        raise NotImplementedError("kernels.attention=triton is not available yet; use auto or reference")
    # Both "auto" (any device, for now) and "reference" land here.
    del device
    return "reference"


def get_impl(name: str) -> tuple[FwdFn, BwdFn]:
    """(block_attn_fwd, block_attn_bwd) of a resolved implementation name.

    "auto" depends on the device: call resolve_impl(name, device) first.
    """
    _check_name(name)
    if name == "auto":
        raise ValueError("get_impl needs a concrete implementation; call resolve_impl('auto', device) first")
    if name == "triton":
        raise NotImplementedError("kernels.attention=triton is not available yet; use auto or reference")
    return reference.block_attn_fwd, reference.block_attn_bwd
