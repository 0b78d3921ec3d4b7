"""Compile the Triton attention kernels for a GPU architecture without a GPU.

The interpreter runs the kernels' logic on CPU but accepts code the real
compiler rejects (loop-carried types, dot shapes, shared memory beyond the
chip). Triton can lower a kernel to a cubin for a named target with the ptxas
it ships, so CPU-only CI can still prove the GPU path compiles and fits in
shared memory. Needs TRITON_INTERPRET unset when this module is imported
(the kernels must be JIT functions, not interpreted ones).

    python -m seqpar.kernels.triton_aot --arch 90 --dtype bf16 --head-dim 128
"""

from __future__ import annotations

import argparse
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seqpar.kernels import triton_attn as ta
from seqpar.kernels import triton_kernels as tk

# Shared memory per block (bytes) a kernel may use on each architecture (CUDA programming guide).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_INT_ARGS = ("Tq", "Tk", "n_kb", "len_bucket")
_META = ("QDoc", "QPos", "KDoc", "KPos", "KLo", "KHi", "QLo", "QHi")
_KERNELS = {
    "fwd": (tk._attn_fwd, ta._FWD_CONFIGS, {"RECORD": False}),
    "bwd_dkdv": (tk._attn_bwd_dkdv, ta._DKDV_CONFIGS, {}),
    "bwd_dq": (tk._attn_bwd_dq, ta._DQ_CONFIGS, {}),
}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "DO"):
            sig[name] = f"*{dtype}"
        elif name in _META:
            sig[name] = "*i32"
        elif name == "Classes":
            sig[name] = "*i8"
        elif name.startswith("stride") or name in _INT_ARGS:
            sig[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:  # outputs and fp32 row statistics
            sig[name] = "*fp32"
    return sig


def compile_kernels(
    arch: int, dtype: str = "bf16", head_dim: int = 128, causal: bool = True, group: int = 4, all_configs: bool = False
) -> list[dict]:
    """Compile fwd, dK/dV and dQ for sm_<arch>; returns one dict per (kernel, config) with shared memory use.

    dtype: fp16 | bf16 | fp32. Only the first autotune config of each kernel
    unless all_configs. Raises whatever Triton raises when a kernel does not compile.
    """
    if ta.interpreting():
        raise RuntimeError("compile_kernels needs TRITON_INTERPRET unset when seqpar.kernels is imported")
    rows = []
    for name, (fn, configs, extra) in _KERNELS.items():
        for cfg in configs if all_configs else configs[:1]:
            consts = dict(
                GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=causal,
                UPCAST=False, IEEE=dtype == "fp32", **extra, **cfg.kwargs,
            )
            src = ASTSource(
                fn=fn,
                signature=_signature(fn, dtype, consts),
                constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
            )
            kernel = triton.compile(
                src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            )
            rows.append(dict(kernel=name, arch=arch, dtype=dtype, head_dim=head_dim, **cfg.kwargs,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages, shared_bytes=kernel.metadata.shared))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 = A100, 90 = H100)")
    p.add_argument("--dtype", default="bf16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--all-configs", action="store_true", help="every autotune candidate, not just the first")
    args = p.parse_args(argv)
    for row in compile_kernels(args.arch, args.dtype, args.head_dim, all_configs=args.all_configs):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
