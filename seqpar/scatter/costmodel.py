"""Cost model of heterogeneity-adaptive scattering (pure; see specs/adaptive-scattering.md).

    cm = build_cost_model(load_profile("A100-40GB"), resolve_model("gpt-7b"), world=64)
    cm.group_time([131072, 4096], degree=16, algorithm="ulysses")   # seconds per micro-batch
    cm.min_degree(200_000)                                           # 32 ranks at K ~ 7.6K tokens

All times are seconds, lengths tokens, bandwidths bytes/s. A group of degree d holding
sequences S runs ``b1 + [b2 if it communicates] + sum_k seq_cost(s_k, d, algorithm)``: every
per-sequence term is additive (a ring runs sequence by sequence, so its exposed communication
``max(0, comm - attention)`` is per sequence), which keeps the planner's MILP linear and the
lower bound exact in form.
"""

from __future__ import annotations


import numpy as np
from dataclasses import dataclass, field
from typing import Any

from seqpar.config import ModelConfig
from seqpar.hardware import HardwareProfile
from seqpar.model.flops import matmul_params
from seqpar.parallel.pool import powers_of_two

#: Group algorithms. "local" is degree 1 (no communication).
ALGORITHMS: tuple[str, ...] = ("local", "ulysses", "ring", "hybrid")
GB = 1e9
#: Reference model of the published FlexSP constants (GPT-7B shapes; SwiGLU 8/3 h = GPT 4h MLP).
REFERENCE_MODEL = ModelConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=50257)


class CostModelError(ValueError):
    """A profile or model cannot give a cost model; the message says which key to add or fix."""


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


#: Power-of-two degrees 1, 2, 4, ... <= world: the candidate group sizes (the group pool's).
degrees_upto = powers_of_two


@dataclass(frozen=True)
class CostModel:
    """Per-group time and memory of one model on one cluster at one world size.

    a1: s/token^2 (attention, one device); a2: s/token (linear layers); b1: s per group and
    micro-batch; b2: s per communicating group (collective latency); capacity: K tokens per
    rank; alltoall_bw: bytes/s per rank of a d-rank all-to-all, by d; p2p_intra_bw /
    p2p_inter_bw: bytes/s of one ring link inside / across nodes; n_layers, hidden, kv_hidden,
    n_heads, n_kv_heads, head_dim: model shapes; elem_bytes: bytes per activation element;
    act_bytes_per_token and state_bytes_per_rank: memory terms behind ``capacity``.
    """

    world: int
    a1: float
    a2: float
    b1: float
    b2: float
    capacity: int
    gpus_per_node: int
    alltoall_bw: dict[int, float]
    p2p_intra_bw: float
    p2p_inter_bw: float
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    elem_bytes: int = 2
    act_bytes_per_token: float = 0.0
    state_bytes_per_rank: float = 0.0
    memory_bytes: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    #: SP algorithms groups of two or more ranks may run (``scatter.algorithms``).
    allowed: tuple[str, ...] = ("ulysses", "ring", "hybrid")

    def __post_init__(self) -> None:
        if self.capacity < 1:
            states, usable = self.state_bytes_per_rank / 2**30, self.memory_bytes / 2**30
            raise CostModelError(
                f"capacity K={self.capacity} tokens per rank: the model states ({states:.1f} GiB per rank) leave no room "
                f"for activations in {usable:.1f} GiB; use more ranks or a smaller model")
        if self.world < 1:
            raise CostModelError(f"world={self.world} must be >= 1")
        bad = [a for a in self.allowed if a not in ALGORITHMS[1:]]
        if bad or not self.allowed or set(self.allowed) == {"hybrid"}:
            raise CostModelError(f"allowed algorithms {list(self.allowed)}: choose among ulysses, ring, hybrid, with ring "
                                 "or ulysses among them (hybrid alone leaves groups of two ranks without an algorithm)")

    # -- sizes -------------------------------------------------------------------------------
    @property
    def hidden(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def max_degree(self) -> int:
        """The largest group: a power of two <= world with an allowed algorithm (degrees that can
        run one form a prefix 1, 2, 4, ...: the Ulysses head rule holds for d/2 when it holds for d)."""
        d = 1 << (self.world.bit_length() - 1)
        while d > 1 and not self.algorithms(d):
            d //= 2
        return d

    def min_degree(self, s: int) -> int:
        """minSP(s) = 2^ceil(log2(ceil(s / K))): the smallest group that holds a sequence of s tokens."""
        need = max(1, -(-int(s) // self.capacity))
        return 1 << (need - 1).bit_length()

    def fits(self, s: int) -> bool:
        return self.min_degree(s) <= self.max_degree

    def split(self, d: int, algorithm: str) -> tuple[int, int]:
        """(ulysses degree, ring degree) of a group."""
        if algorithm == "hybrid":
            u = self._hybrid_inner(d)
            return u, d // u
        return (d, 1) if algorithm in ("ulysses", "local") else (1, d)

    def ulysses_ok(self, u: int) -> bool:
        """Whether an all-to-all over u ranks can split this model's heads (``ulysses_head_error``)."""
        from seqpar.parallel.dims import ulysses_head_error

        return ulysses_head_error(self.n_heads, self.n_kv_heads, u) is None

    def _hybrid_inner(self, d: int) -> int:
        u = 1
        while u * 2 <= min(d // 2, self.gpus_per_node) and self.ulysses_ok(u * 2):
            u *= 2
        return u

    def algorithms(self, d: int) -> list[str]:
        """Algorithms a group of degree d can run: the allowed ones, Ulysses only where the head
        rule holds for d, hybrid only with an inner Ulysses degree of at least 2."""
        if d == 1:
            return ["local"]
        algos = []
        if "ulysses" in self.allowed and self.ulysses_ok(d):
            algos.append("ulysses")
        if "ring" in self.allowed:
            algos.append("ring")
        if "hybrid" in self.allowed and d > 2 and self._hybrid_inner(d) > 1:
            algos.append("hybrid")
        return algos

    # -- bandwidths --------------------------------------------------------------------------
    def a2a_bw(self, d: int) -> float:
        """All-to-all bytes/s per rank for d consecutive ranks (nearest measured degree at or below d)."""
        keys = sorted(k for k in self.alltoall_bw if k <= d) or sorted(self.alltoall_bw)
        return self.alltoall_bw[keys[-1]]

    def p2p_bw(self, d: int, strided: bool = False) -> float:
        """Slowest ring link of a d-rank ring: across nodes once the ring spans nodes."""
        return self.p2p_inter_bw if (strided or d > self.gpus_per_node) else self.p2p_intra_bw

    # -- per-sequence terms (seconds, additive within a group) -------------------------------
    def kv_hidden(self, u: int) -> int:
        """KV width after replication for an all-to-all over u ranks (GQA: heads copied up to u)."""
        return max(self.n_kv_heads, u) * self.head_dim if u > 1 else self.n_kv_heads * self.head_dim

    def ulysses_bytes(self, s: float, d: int, u: int | None = None) -> float:
        """Bytes each rank sends for one sequence (all layers, fwd + bwd) in an all-to-all over u of d ranks."""
        u = d if u is None else u
        if u <= 1:
            return 0.0
        return self.n_layers * 2 * (s / d) * (2 * self.hidden + 2 * self.kv_hidden(u)) * self.elem_bytes * (u - 1) / u

    def ring_bytes(self, s: float, d: int, r: int | None = None, kv_hidden: int | None = None) -> float:
        """Bytes each rank sends around an r-rank ring (fwd: KV; bwd: KV + fp32 dKV), all layers."""
        r = d if r is None else r
        if r <= 1:
            return 0.0
        hkv = self.n_kv_heads * self.head_dim if kv_hidden is None else kv_hidden
        return self.n_layers * (r - 1) * 2 * (s / d) * hkv * (2 * self.elem_bytes + 4)

    def seq_cost(self, s: float, d: int, algorithm: str) -> float:
        """Seconds one sequence of s tokens adds to a group of degree d running ``algorithm``
        (s may be a float64 numpy array: one cost per sequence)."""
        attn = self.a1 * s * s / d
        comp = attn + self.a2 * s / d
        if algorithm == "local":
            return comp
        if algorithm == "ulysses":
            return comp + self.ulysses_bytes(s, d) / self.a2a_bw(d)
        if algorithm == "ring":
            return comp + np.maximum(0.0, self.ring_bytes(s, d) / self.p2p_bw(d) - attn)
        if algorithm == "hybrid":
            u, r = self.split(d, "hybrid")
            a2a = self.ulysses_bytes(s, d, u) / self.a2a_bw(u)
            ring = self.ring_bytes(s, d, r, self.kv_hidden(u)) / self.p2p_bw(d, strided=True)
            return comp + a2a + np.maximum(0.0, ring - attn)
        raise CostModelError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")

    def group_const(self, d: int) -> float:
        """Fixed seconds of a used group per micro-batch: b1, plus b2 when it communicates."""
        return self.b1 + (self.b2 if d > 1 else 0.0)

    def group_time(self, lengths, d: int, algorithm: str) -> float:
        """Predicted seconds of a group of degree d holding these sequences for one micro-batch."""
        return self.group_const(d) + sum(self.seq_cost(s, d, algorithm) for s in lengths)

    def best_seq_cost(self, s: float, d: int) -> tuple[float, str]:
        return min((self.seq_cost(s, d, a), a) for a in self.algorithms(d))

    def degree_algorithm(self, d: int, lengths) -> str:
        """One algorithm per degree: the cheapest summed over these sequences (those that fit at d)."""
        algos = self.algorithms(d)
        fit = [s for s in lengths if self.min_degree(s) <= d] or list(lengths) or [self.capacity]
        return min(algos, key=lambda a: sum(self.seq_cost(s, d, a) for s in fit))

    def tokens_ok(self, lengths, d: int) -> bool:
        return sum(lengths) <= d * self.capacity

    def memory_per_rank(self, tokens_per_rank: float) -> float:
        """Bytes per rank: model states + activations of tokens_per_rank tokens."""
        return self.state_bytes_per_rank + self.act_bytes_per_token * tokens_per_rank


def _bw_table(profile: HardwareProfile, key: str) -> dict:
    table = profile.extra.get(key)
    if not isinstance(table, dict) or not table:
        raise CostModelError(f"hardware profile {profile.source or profile.name} has no '{key}' table; "
                             "add one (GB/s) or measure it with `seqpar profile`")
    return table


def build_cost_model(profile: HardwareProfile, model: ModelConfig, world: int) -> CostModel:
    """Cost model for ``model`` on ``world`` ranks of ``profile``.

    Profile keys used (besides ``device_memory_gib``): ``gpus_per_node``; ``alltoall_bw_gbps``
    {degree: GB/s}; ``p2p_bw_gbps`` {intra_node, inter_node: GB/s}; ``scatter_compute`` with
    ``a1_ms_per_token2``, ``a2_ms_per_token``, ``b1_ms``, optional ``b2_ms``,
    ``activation_bytes_per_token``, ``memory_fraction`` and ``reference_model`` (a model
    section the constants were fitted on). Constants are scaled to ``model`` by FLOPs: a1 by
    layers x heads x head_dim, a2 and b1 by matmul parameters, activations by layers x hidden.
    """
    if world < 1:
        raise CostModelError(f"--world={world} must be >= 1")
    sc = profile.extra.get("scatter_compute")
    if not isinstance(sc, dict):
        raise CostModelError(f"hardware profile {profile.source or profile.name} has no 'scatter_compute' section; "
                             "add the fitted a1/a2/b1 constants or run `seqpar profile`")
    ref_raw = sc.get("reference_model")
    ref = ModelConfig(**ref_raw) if isinstance(ref_raw, dict) else REFERENCE_MODEL
    a2a = {int(k): float(v) * GB for k, v in _bw_table(profile, "alltoall_bw_gbps").items()}
    p2p = _bw_table(profile, "p2p_bw_gbps")
    mem_gib = profile.device_memory_gib
    if mem_gib is None:
        raise CostModelError(f"hardware profile {profile.name}: device_memory_gib is unknown; set it to compute capacity")
    vocab = model.vocab_size or ref.vocab_size
    mcfg = ModelConfig(**{**model.__dict__, "vocab_size": vocab})
    attn_ratio = (mcfg.n_layers * mcfg.dim) / (ref.n_layers * ref.dim)  # attention FLOPs per token pair
    lin_ratio = matmul_params(mcfg) / matmul_params(ref)
    act_ratio = attn_ratio  # activations per token scale with layers x hidden
    params = matmul_params(mcfg) + (0 if mcfg.tie_embeddings else mcfg.dim * vocab)  # + untied input embedding
    # FSDP over all ranks: bf16 params + grads, fp32 master + Adam m, v = 16 bytes/param, sharded;
    # plus one layer gathered (params + grads, bf16) at a time.
    state = 16.0 * params / world + 4.0 * (params / mcfg.n_layers)
    act = float(sc.get("activation_bytes_per_token", 4.5e6)) * act_ratio
    usable = float(sc.get("memory_fraction", 0.9)) * mem_gib * 2**30
    capacity = int((usable - state) // act) if usable > state else 0
    return CostModel(
        world=world,
        a1=float(sc["a1_ms_per_token2"]) * 1e-3 * attn_ratio,
        a2=float(sc["a2_ms_per_token"]) * 1e-3 * lin_ratio,
        b1=float(sc["b1_ms"]) * 1e-3 * lin_ratio,
        b2=float(sc.get("b2_ms", 0.0)) * 1e-3,
        capacity=capacity,
        gpus_per_node=int(profile.extra.get("gpus_per_node", 8)),
        alltoall_bw=a2a,
        p2p_intra_bw=float(p2p["intra_node"]) * GB,
        p2p_inter_bw=float(p2p["inter_node"]) * GB,
        n_layers=mcfg.n_layers,
        n_heads=mcfg.n_heads,
        n_kv_heads=mcfg.n_kv_heads,
        head_dim=mcfg.head_dim,
        act_bytes_per_token=act,
        state_bytes_per_rank=state,
        memory_bytes=usable,
        notes={"profile": profile.name, "attn_ratio": attn_ratio, "linear_ratio": lin_ratio},
    )


class CostTable:
    """Per-sequence costs of one batch for every degree and algorithm, precomputed (numpy).

    cost[d][algorithm]: float64 [n] seconds; best[d]: float64 [n], the cheapest algorithm.
    """

    def __init__(self, cm: CostModel, lengths) -> None:
        self.cm = cm
        self.lengths = np.asarray(lengths, dtype=np.int64)
        s = self.lengths.astype(np.float64)
        self.degrees = degrees_upto(cm.max_degree)
        self.cost = {d: {a: np.broadcast_to(np.asarray(cm.seq_cost(s, d, a), dtype=np.float64), s.shape)
                         for a in cm.algorithms(d)} for d in self.degrees}
        self.best = {d: np.min(np.stack(list(self.cost[d].values())), axis=0) for d in self.degrees}
        #: float64 [n, degrees, ALGORITHMS]: cost; 1e30 (finite, so sums stay subtractable) where an
        #: algorithm cannot run at that degree.
        self.all = np.full((s.size, len(self.degrees), len(ALGORITHMS)), 1e30)
        self.deg_index = {d: k for k, d in enumerate(self.degrees)}
        for k, d in enumerate(self.degrees):
            for a, c in self.cost[d].items():
                self.all[:, k, ALGORITHMS.index(a)] = c
        self.min_degree = np.array([cm.min_degree(int(x)) for x in self.lengths], dtype=np.int64)

    def group(self, d: int, ids) -> tuple[float, str]:
        """(seconds, algorithm) of the best algorithm for a group of degree d holding ``ids``."""
        idx = np.asarray(ids, dtype=np.int64)
        const = self.cm.group_const(d)
        return min((const + float(c[idx].sum()), a) for a, c in self.cost[d].items())

    def seq(self, i: int, d: int) -> dict[str, float]:
        return {a: float(c[i]) for a, c in self.cost[d].items()}

    def tokens(self, ids) -> int:
        return int(self.lengths[np.asarray(ids, dtype=np.int64)].sum())
