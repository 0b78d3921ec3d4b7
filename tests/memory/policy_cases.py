"""Worker-side code of the memory-policy tests: the same model under none / full / selective / offload
/ memo (alpha 0, 0.5, 1), with attention calls and attention collectives counted in forward and in
backward."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

from seqpar.config import ModelConfig

CFG = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64)
DOCS = [23, 1, 40, 7, 29]  # odd and uneven: 100 tokens, not a multiple of 2 x world
#: Policy names; ``memo@a`` is memo with alpha a.
POLICIES = ("none", "full", "selective", "offload", "memo@0", "memo@0.5", "memo@1")


class CountingAttention:
    """The injected attention, counting its calls (forward runs, recomputes included)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, q, k, v, ctx):
        self.calls += 1
        return self.inner(q, k, v, ctx)


class CollectiveCounter(contextlib.AbstractContextManager):
    """Counts launches of the attention collectives (ring P2P batches, Ulysses all-to-alls)."""

    NAMES = ("batch_isend_irecv", "all_to_all_single")

    def __init__(self) -> None:
        self.count, self._saved = 0, {}

    def __enter__(self):
        for name in self.NAMES:
            orig = self._saved[name] = getattr(dist, name)

            def counted(*a, _orig=orig, **kw):
                self.count += 1
                return _orig(*a, **kw)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(dist, name, orig)
        return False


def _stream(seed: int = 0):
    tokens = np.random.default_rng(seed).integers(0, CFG["vocab_size"], sum(DOCS))
    return tokens, np.concatenate([[0], np.cumsum(DOCS)]).astype(np.int32)


def run_policy(policy: str, assignment=None, micro_batches: int = 2, depth: int = 1) -> dict:
    """One step (``micro_batches`` copies of the stream, each its own forward/backward) of an fp32
    model under ``policy``; with ``assignment`` (SPAssignment) the stream is sharded over its group
    and gradients are summed over the world. Returns loss, grads and the counts."""
    from seqpar.attention import build_attention
    from seqpar.memory.checkpoint import apply_memory_policy
    from seqpar.memory.transfer import HostEngine
    from seqpar.model.llama import Transformer
    from seqpar.train.batch import make_microbatch, shard_microbatch

    torch.manual_seed(0)
    attention = CountingAttention(build_attention("reference", torch.device("cpu")))
    model = Transformer(ModelConfig(**CFG), attention)
    model.loss_chunk_tokens = 16
    engine = HostEngine(depth)
    name, _, alpha = policy.partition("@")
    # offload, memo: 2 of 3 blocks
    apply_memory_policy(model.layers, name, engine=engine, keep_last=1, alpha=float(alpha or 1))
    mb = make_microbatch(*_stream(), torch.device("cpu"))
    targets = mb.num_targets * micro_batches
    if assignment is not None:
        mb = shard_microbatch(mb, assignment)
    fwd = bwd = 0
    total = 0.0
    for _ in range(micro_batches):
        with CollectiveCounter() as c:
            loss = model(mb.tokens, mb.ctx, labels=mb.labels) / targets
        fwd += c.count
        with CollectiveCounter() as c:
            loss.backward()
        bwd += c.count
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if assignment is not None:
        for g in grads.values():
            dist.all_reduce(g)
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t)
        total = float(t)
    return {"loss": total, "grads": grads, "attention_calls": attention.calls, "fwd_collectives": fwd,
            "bwd_collectives": bwd, "offloaded_bytes": engine.stats.offloaded_bytes,
            "late_reloads": engine.stats.late_reloads, "host_bytes_after": engine.stats.host_bytes}


def sp_policy_matrix(shapes: list[tuple[str, int, int]]) -> dict:
    """Inside a pool worker: every (algorithm, ulysses, ring) shape under every policy, plus the
    single-device run of the same step (the oracle)."""
    from seqpar.train.batch import SPAssignment
    from tests.support.dist import sp_groups

    out = {"single": run_policy("none")}
    for algorithm, u, r in shapes:
        groups = sp_groups(u, r)
        layout = "contiguous" if algorithm == "ulysses" else "zigzag"
        assignment = SPAssignment(algorithm, layout, groups.sp_group)
        for policy in POLICIES:
            out[(algorithm, policy)] = run_policy(policy, assignment)
    return out
