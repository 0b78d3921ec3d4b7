"""Choose a block-attention implementation from the config value.

Config: kernels.attention = auto | triton | sdpa_cpu | reference. Layers never
name an implementation themselves; they pass the config string through
resolve_impl, and every distributed path (ring, Ulysses, hybrid) takes its
kernels from get_impl.

sdpa_cpu: blocks of whole documents (single device, Ulysses' gathered tokens,
degree-1 groups) run torch's fused CPU flash kernel (kernels/cpu_flash.py); ring
steps run it per tile of document chunks (kernels/cpu_tiles.py); arbitrary masks
the torch reference.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from seqpar.kernels import reference

CHOICES = ("auto", "triton", "reference", "sdpa_cpu")

FwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
MergeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    """Map a config value to "triton", "sdpa_cpu" or "reference" for tensors on device.

    auto: Triton on CUDA when triton is installed, sdpa_cpu on CPU, the torch
    reference elsewhere. sdpa_cpu: CPU only. triton: CUDA, or any device under TRITON_INTERPRET=1 (the slow
    CPU interpreter, for tests); otherwise a ValueError that says what to set.
    """
    _check_name(name)
    device = torch.device(device)
    if name == "reference":
        return "reference"
    if name == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "sdpa_cpu" if device.type == "cpu" else "reference"
    if name == "sdpa_cpu":
        if device.type != "cpu":
            raise ValueError(f"kernels.attention=sdpa_cpu runs on CPU (this run is on {device.type}); use auto")
        return "sdpa_cpu"
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
    if name == "sdpa_cpu":  # ring steps: fused tiles of document chunks, else the reference
        from seqpar.kernels import cpu_tiles

        return cpu_tiles.block_attn_fwd, cpu_tiles.block_attn_bwd
    return reference.block_attn_fwd, reference.block_attn_bwd


def get_merge(name: str) -> MergeFn:
    """The merge of partial (out, lse) pairs for a resolved implementation name.

    triton: one fused kernel that rescales and accumulates into the running (out, lse) in place
    (both fp32, owned by the caller); reference (and the CPU path): the torch reference merge,
    which returns new tensors. Callers use the returned pair either way.
    """
    _check_name(name)
    if name == "triton":
        from seqpar.kernels import triton_merge

        return triton_merge.merge_
    return reference.merge
