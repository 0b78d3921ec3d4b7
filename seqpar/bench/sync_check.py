"""No host synchronisation in single-device attention: forward + backward of the Triton kernel.

ARCHITECTURE.md asks that attention never makes the host wait for the device: everything
that depends on the layout is computed on the host once per micro-batch. This check runs the
attention the model runs on one device (``seqpar.attention.build_attention`` with
``kernels.attention=triton``, resolved by the kernel dispatcher; no SP context) on a packed
stream of documents, forward and backward, and compares it with the torch reference.

- CUDA: the checked call runs under ``torch.cuda.set_sync_debug_mode("error")``, which raises
  at any host synchronisation. The first call (Triton's autotuning times kernels, which
  synchronises) and the host-to-device copies of the batch happen before, as in training.
- CPU (``TRITON_INTERPRET=1``, tiny shapes): the same code runs under :class:`SyncCounter`,
  which records the calls that would synchronise a GPU (``item``, ``bool``/``int``/``float``
  of a tensor, ``nonzero``, ``tolist``, ``cpu``, ...) made outside Triton's interpreter.

    python -m seqpar.bench.sync_check --json sync_check.json          # GPU: bf16, 32K tokens, 4 documents
    TRITON_INTERPRET=1 python -m seqpar.bench.sync_check --tokens 64 --head-dim 16 --heads 4 --kv-heads 2
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from seqpar.attention.context import AttnContext

# What synchronises a GPU, seen at two levels. Aten ops (reached from forward and backward
# alike): reading a scalar (item, bool/int/float of a tensor) and outputs whose size depends on
# values; repeat_interleave counts only without output_size. Tensor methods that never reach the
# dispatcher for CPU tensors (seen in forward code only: autograd does not run torch-function
# modes inside backward).
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "repeat_interleave",
})
# cpu() is seen through a torch-function mode (forward code); tolist, numpy and __array__ are
# patched on the Tensor class while counting, so backward code is covered too.
SYNCING_METHODS = frozenset({"cpu"})
PATCHED_METHODS = ("tolist", "numpy", "__array__")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Max |triton - reference| / max |reference|, per output; both sides round to the input dtype.
TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-4}


def _top(frame: Any) -> str:
    return frame.f_globals.get("__name__", "").split(".")[0]


def _caller() -> str | None:
    """file:line of the innermost frame outside torch and this module; None inside Triton's interpreter."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_globals.get("__name__") == __name__ or _top(frame) == "torch"):
        frame = frame.f_back
    if frame is None or _top(frame) == "triton":
        return None  # the interpreter emulates the device on the host: its reads are not host syncs
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class _MethodCounter(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") in SYNCING_METHODS:
            self.counter._record(func.__name__)
        return func(*args, **(kwargs or {}))


class SyncCounter(TorchDispatchMode):
    """CPU proxy for CUDA's sync debug mode: records the calls that would synchronise a GPU.

    Use as a context manager; ``sites`` holds ``op at file:line`` of each one made by code
    outside torch and Triton's interpreter, ``count`` their number.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []
        self._methods = _MethodCounter(self)
        self._saved: dict[str, Callable | None] = {}
        self._paused = 0
        self._in_method = False

    @property
    def count(self) -> int:
        return len(self.sites)

    def _record(self, name: str) -> None:
        if not self._paused and (where := _caller()):
            self.sites.append(f"{name} at {where}")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Calls inside are not counted (an oracle kernel that may synchronise, by design)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __enter__(self) -> "SyncCounter":
        super().__enter__()
        self._methods.__enter__()
        for name in PATCHED_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from TensorBase

            def wrapper(t: torch.Tensor, *a: Any, _name: str = name, _f: Callable = original, **kw: Any) -> Any:
                # The C method re-enters through torch-function handling, which calls the
                # patched attribute again: count the outermost call only.
                if self._in_method:
                    return _f(t, *a, **kw)
                self._record(_name)
                self._in_method = True
                try:
                    return _f(t, *a, **kw)
                finally:
                    self._in_method = False

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, own in self._saved.items():
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        self._saved.clear()
        self._methods.__exit__(*exc)
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
            self._record(name)
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self._record("boolean-mask index")  # its output size depends on the mask's values
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[SyncCounter]:
    """CUDA: raise at any host synchronisation inside the block; CPU: count would-be syncs."""
    counter = SyncCounter()
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    else:
        with counter:
            yield counter


@dataclass
class SyncResult:
    device: str
    detector: str  # how syncs were detected
    dtype: str
    tokens: int
    doc_lengths: list[int]
    heads: int
    kv_heads: int
    head_dim: int
    host_syncs: int
    sync_sites: list[str]
    rel_err: dict[str, float] = field(default_factory=dict)  # max |triton - reference| / max |reference|
    tolerance: float = 0.0
    checked_ms: float = 0.0  # wall time of the checked forward + backward (includes the sync on CPU)
    passed: bool = False


def doc_lengths(tokens: int, docs: int) -> list[int]:
    """Uneven document lengths (weights docs, docs-1, ..., 1) summing to tokens; none shorter than 1."""
    docs = max(1, min(docs, tokens))
    weights = list(range(docs, 0, -1))
    lengths = [max(1, tokens * w // sum(weights)) for w in weights]
    lengths[0] += tokens - sum(lengths)
    return lengths


def _fwd_bwd(attn: Callable, inputs: list[torch.Tensor], dout: torch.Tensor, ctx: AttnContext) -> list[torch.Tensor]:
    """out and dq, dk, dv of one forward + backward; inputs are fresh leaves."""
    out = attn(*inputs, ctx)
    out.backward(dout)
    return [out.detach(), *(x.grad for x in inputs)]


def run_sync_check(
    tokens: int = 32768,
    docs: int = 4,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 128,
    dtype: str = "bf16",
    device: str | None = None,
    seed: int = 0,
) -> SyncResult:
    """One checked forward + backward of the Triton attention; see the module docstring.

    q: [tokens, heads, head_dim], k, v: [tokens, kv_heads, head_dim] in ``dtype`` on ``device``
    (default: CUDA when available, else CPU, which needs TRITON_INTERPRET=1 at import).
    """
    from seqpar.attention import build_attention
    from seqpar.attention.context import AttnContext
    from seqpar.kernels.varlen import doc_ids_and_positions

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    triton_attn = build_attention("triton", dev)  # the model's attention, impl resolved by the dispatcher
    reference = build_attention("reference", dev)
    lengths = doc_lengths(tokens, docs)
    # As in training (seqpar.train.batch): metadata computed on the host, then copied once.
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    doc, pos = doc_ids_and_positions(cu)
    ctx = AttnContext(positions=pos.to(dev), doc_ids=doc.to(dev), cu_seqlens=cu.to(dev))
    g = torch.Generator().manual_seed(seed)
    shapes = [(tokens, heads, head_dim), (tokens, kv_heads, head_dim), (tokens, kv_heads, head_dim)]
    base = [torch.randn(*s, generator=g).to(dev, DTYPES[dtype]) for s in shapes]
    dout = torch.randn(tokens, heads, head_dim, generator=g).to(dev, DTYPES[dtype])

    def leaves() -> list[torch.Tensor]:
        return [x.detach().clone().requires_grad_(True) for x in base]

    if dev.type == "cuda":
        _fwd_bwd(triton_attn, leaves(), dout, ctx)  # compiles and autotunes (synchronises: not checked)
        torch.cuda.synchronize(dev)
    inputs = leaves()
    result = SyncResult(
        str(dev), "torch.cuda.set_sync_debug_mode('error')" if dev.type == "cuda" else "SyncCounter (CPU proxy)",
        dtype, tokens, lengths, heads, kv_heads, head_dim, host_syncs=0, sync_sites=[], tolerance=TOLERANCE[dtype],
    )
    t0 = time.perf_counter()
    try:
        with no_host_sync(dev) as counter:
            got = _fwd_bwd(triton_attn, inputs, dout, ctx)
    except RuntimeError as e:  # sync debug mode "error" raises at the synchronising call
        if "synchroniz" not in str(e).lower():
            raise
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        result.host_syncs, result.sync_sites = 1, [str(e).splitlines()[0][:200] + where]
        return result
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result.checked_ms = (time.perf_counter() - t0) * 1e3
    result.host_syncs, result.sync_sites = counter.count, counter.sites
    want = _fwd_bwd(reference, leaves(), dout, ctx)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        scale = float(b.float().abs().max()) or 1.0
        result.rel_err[name] = float((a.float() - b.float()).abs().max()) / scale
    result.passed = result.host_syncs == 0 and all(e <= result.tolerance for e in result.rel_err.values())
    return result


def format_result(r: SyncResult) -> str:
    errs = " ".join(f"{k} {v:.1e}" for k, v in r.rel_err.items()) or "n/a"
    sites = "".join(f"\n  host sync: {s}" for s in r.sync_sites)
    return (
        f"sync check: {r.device} {r.dtype} T={r.tokens} ({len(r.doc_lengths)} docs) heads {r.heads}/{r.kv_heads} "
        f"head_dim {r.head_dim} | host syncs {r.host_syncs} ({r.detector}) | rel err vs reference {errs} "
        f"(tol {r.tolerance:.0e}) | {'passed' if r.passed else 'FAILED'}{sites}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar.bench.sync_check", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--docs", type=int, default=4, help="packed documents of uneven lengths")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the result as JSON to this path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        from seqpar.kernels.triton_attn import interpreting

        if not interpreting():
            print("sync check: no CUDA device; set TRITON_INTERPRET=1 to run the Triton kernel on CPU", file=sys.stderr)
            return 2
    result = run_sync_check(args.tokens, args.docs, args.heads, args.kv_heads, args.head_dim, args.dtype, seed=args.seed)
    print(format_result(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=1)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
