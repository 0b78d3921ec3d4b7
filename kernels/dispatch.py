"""Choose a block-attention implementation from the config value.

Config: kernels.attention = auto | triton | reference. Layers never name an
implementation themselves; they pass the config string through resolve_impl,
and every distributed path (ring, Ulysses, hybrid) takes its kernels from get_impl.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from seqpar.kernels import reference

CHOICES = ("auto", "triton", "reference")

FwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _check_name(name: str) -> None:
    if name not in CHOICES:
        raise ValueError(f"kernels.attention={name!r} is not one of {', '.join(CHOICES)}")


def triton_available() -> bool:
    """Whether the triton package is installed (it is a Linux x86-64 dependency)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    from seqpar.kernels.triton_attn import interpreting

    return interpreting()


def resolve_impl(name: str, device: torch.device | str) -> str:
    """Map a config value to "triton" or "reference" for tensors on device.

    auto: Triton on CUDA when triton is installed, the torch reference
    elsewhere. triton: CUDA, or any device under TRITON_INTERPRET=1 (the slow
    CPU interpreter, for tests); otherwise a ValueError that says what to set.
    """
    _check_name(name)
    device = torch.device(device)
    if name == "reference":
        return "reference"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if not triton_available():
        raise ValueError("kernels.attention=triton needs the triton package (pip install triton); or use auto/reference")
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"kernels.attention=triton needs a CUDA device (this run is on {device.type}); "
            "use kernels.attention=auto or reference, or set TRITON_INTERPRET=1 for the slow CPU interpreter"
        )
    return "triton"


def get_impl(name: str) -> tuple[FwdFn, BwdFn]:
    """(block_attn_fwd, block_attn_bwd) of a resolved implementation name.

    "auto" depends on the device: call resolve_impl(name, device) first.
    """
    _check_name(name)
    if name == "auto":
        raise ValueError("get_impl needs a concrete implementation; call resolve_impl('auto', device) first")
    if name == "triton":
        from seqpar.kernels import triton_attn

        return triton_attn.block_attn_fwd, triton_attn.block_attn_bwd
    return reference.block_attn_fwd, reference.block_attn_bwd
