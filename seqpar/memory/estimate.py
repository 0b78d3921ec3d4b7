"""Per-rank device memory of a training step, from the model config and the parallel layout (pure).

    layout = MemoryLayout(algorithm="ulysses", ulysses=8, state_shards=8, precision="bf16")
    est = estimate_memory(model_cfg, "selective", tokens=16384, layout=layout)
    est.peak_bytes, est.rows()                     # total and the breakdown
    max_tokens(model_cfg, "selective", layout, device_bytes=80 * 2**30)   # longest shard that fits

Counted from what autograd actually keeps for each op of ``seqpar.model.llama`` (checked against
saved-tensor hooks and MemTracker in tests/memory/test_estimate.py), per local token and layer:

- RMSNorm keeps its fp32 input (a copy under bf16), the fp32 normalised rows, the fp32 rsqrt and
  its output in the compute dtype: 8h + 4 + e*h bytes (h = dim, e = compute element bytes).
- Attention keeps q (after RoPE), k, v, its output and the fp32 lse; RoPE keeps only the shared
  cos/sin tables. Ulysses and hybrid hold whole sequences (of the ring shard) for a head subset:
  per local token the same q width, K/V replicated up to the all-to-all degree when kv heads are
  fewer, and the output twice (head layout for attention's backward, token layout for ``wo``).
- SwiGLU keeps w1 x, silu(w1 x), w3 x and their product: 4 e f.

Policies: ``none`` keeps all of it; ``full`` keeps each block's input and recomputes one whole
block at a time in backward; ``selective`` keeps the block input and attention's tensors and
recomputes the token-local stages one at a time (the MLP stage is the larger); ``offload`` moves
all of it to host memory except in the last ``keep_last`` blocks, with ``depth`` blocks in flight;
``memo`` offloads the block input, attention's tensors and the token-local tensors of the first
``alpha`` of the tokens, and recomputes the token-local stages of the rest (one stage at a time).
The peak is reached either at the end of the forward (every layer's saved tensors, the head's,
and one chunk of logits) or early in the backward (every layer's saved tensors, one layer's
recomputed tensors and the backward's gradient workspace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from seqpar.config import MEMORY_POLICIES, ModelConfig

ALGORITHMS = ("local", "ring", "ulysses", "hybrid")
PRECISIONS = ("fp32", "bf16", "autocast")
#: Share of device memory a peak may use: the CUDA context, NCCL's buffers and the caching
#: allocator's fragmentation take the rest (the cost model's ``memory_fraction`` default too).
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryLayout:
    """How one rank runs the model, as far as memory is concerned.

    algorithm: local | ring | ulysses | hybrid, with its ``ulysses`` x ``ring`` degrees;
    state_shards: ranks the parameters, gradients and optimizer state are sharded over (FSDP's
    dp x sp; 1 when replicated); precision: fp32 | bf16 (FSDP mixed precision: bf16 gathered
    parameters and activations, fp32 norms, master weights and reduction) | autocast (replicated
    parameters under torch.autocast: fp32 residual stream, bf16 matmul outputs and a cached bf16
    copy of every weight); attention: flash (Triton / fused kernels: no score matrix) |
    reference (torch reference kernel: score blocks of ``score_block_bytes``);
    loss_chunk_tokens: tokens per chunk of the LM head and loss (0: all tokens at once).
    """

    algorithm: str = "local"
    ulysses: int = 1
    ring: int = 1
    state_shards: int = 1
    precision: str = "bf16"
    attention: str = "flash"
    score_block_bytes: int = 64 << 20
    loss_chunk_tokens: int = 4096
    keep_last: int = 2  # offload, memo: blocks at the end that keep their saved tensors
    depth: int = 1  # offload, memo: the transfer engine's layers of copies in flight
    alpha: float = 1.0  # memo: share of the tokens whose token-local tensors are kept (offloaded)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.attention not in ("flash", "reference"):
            raise ValueError(f"attention={self.attention!r}: choose flash or reference")
        if min(self.ulysses, self.ring, self.state_shards) < 1:
            raise ValueError("ulysses, ring and state_shards must be >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")

    @property
    def all_to_all(self) -> int:
        """Degree of the head all-to-all (1: none)."""
        return self.ulysses if self.algorithm in ("ulysses", "hybrid") else 1

    @property
    def ring_degree(self) -> int:
        return self.ring if self.algorithm in ("ring", "hybrid") else 1

    @property
    def elem(self) -> int:
        """Bytes of an activation in the compute dtype."""
        return 4 if self.precision == "fp32" else 2

    @property
    def residual_elem(self) -> int:
        """Bytes of the residual stream (fp32 under autocast: the embedding output is fp32)."""
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class LayerBytes:
    """Bytes per local token of one transformer block: ``saved`` from forward to backward under a
    policy, ``recompute`` held while backward recomputes one block (or stage), ``workspace`` the
    backward's gradient buffers at that moment, ``attention`` attention's own transient buffers
    (kernel workspace, communication in flight, dq/dk/dv)."""

    saved: float
    recompute: float
    workspace: float
    attention: float


def _widths(m: ModelConfig, lay: MemoryLayout) -> tuple[int, int, int]:
    """(query width, K/V width per local token after replication for the all-to-all, heads)."""
    u = lay.all_to_all
    kv = m.head_dim * (max(m.n_kv_heads, u) if u > 1 else m.n_kv_heads)
    return m.n_heads * m.head_dim, kv, m.n_heads


class _Terms(NamedTuple):
    """Per-token bytes of one block's saved tensors, by op (see the module doc)."""

    norm: int  # one RMSNorm
    casts: int  # autocast's copies of the norms' outputs
    attn: int  # attention's q, k, v, output(s) and lse
    mlp: int  # SwiGLU's four f-wide tensors
    block_input: int

    @property
    def none(self) -> int:
        return 2 * self.norm + self.casts + self.attn + self.mlp


def _terms(m: ModelConfig, lay: MemoryLayout) -> _Terms:
    h, e = m.dim, lay.elem
    hq, hkv, heads = _widths(m, lay)
    outs = 2 if lay.all_to_all > 1 else 1  # head layout (attention) + token layout (wo)
    # Under autocast wq, wk, wv and w1, w3 each cast their (shared) input: three extra copies.
    return _Terms(norm=8 * h + 4 + e * h, casts=3 * e * h if lay.precision == "autocast" else 0,
                  attn=e * (hq + 2 * hkv) + outs * e * hq + 4 * heads, mlp=4 * e * m.ffn_dim,
                  block_input=lay.residual_elem * h)


def memo_split(m: ModelConfig, lay: MemoryLayout) -> tuple[float, float]:
    """MEMO's per-token, per-block sizes (S_input + S_attn, S_other): what memo always offloads (the
    block input and attention's tensors) and what the token-local ops keep per kept token. Under
    fp32 and autocast the first norm's saved input is the block input itself (counted once)."""
    t = _terms(m, lay)
    in_norm = t.block_input if lay.precision != "bf16" else 0
    return float(t.block_input + t.attn), float(t.none - t.attn - in_norm)


def layer_bytes(m: ModelConfig, policy: str, lay: MemoryLayout) -> LayerBytes:
    """Per-token bytes of one block under ``policy`` (see the module doc for each term)."""
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"memory.policy={policy!r}: choose one of {', '.join(MEMORY_POLICIES)}")
    t = _terms(m, lay)
    mlp_stage = t.norm + t.mlp + t.casts // 3  # the larger recomputed stage
    fixed, other = memo_split(m, lay)
    a = lay.alpha
    memo = t.none if a >= 1.0 else fixed + a * other
    saved = {"none": t.none, "full": t.block_input, "selective": t.block_input + t.attn, "offload": t.none,
             "memo": memo}[policy]
    recompute = {"none": 0.0, "full": t.none, "selective": mlp_stage, "offload": 0.0,
                 "memo": max(0.0, 1.0 - 2.0 * a) * mlp_stage}[policy]  # memo frees the kept share first
    workspace = 2.0 * lay.elem * m.ffn_dim  # two f-wide gradients alive in the MLP's backward
    hq, hkv, heads = _widths(m, lay)
    return LayerBytes(float(saved), float(recompute), workspace, _attention_transient(m, lay, hq, hkv, heads))


def _attention_transient(m: ModelConfig, lay: MemoryLayout, hq: int, hkv: int, heads: int) -> float:
    """Per local token: attention backward's gradients and fp32 accumulators, K/V blocks in flight
    around the ring (double-buffered, fp32 dK/dV), all-to-all send and receive buffers."""
    e = lay.elem
    grads = e * (hq + 2 * hkv) + 4 * (hq + heads)  # dq, dk, dv; fp32 dq accumulator and delta
    comm = 0.0
    if lay.ring_degree > 1:
        comm += 2 * (e * 2 * hkv + 4 * 2 * hkv)
    if lay.all_to_all > 1:
        comm += 2 * e * (hq + 2 * hkv)
    return grads + comm


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank device bytes of one step of one micro-batch of ``tokens`` local tokens.

    The peak is the states, every layer's saved activations, and the larger of what exists besides
    them at the end of the forward (``head_and_loss``) and early in the backward: one block's
    recomputed tensors plus the larger of the MLP backward's ``workspace`` and attention backward's
    (``attention_workspace``: gradients, fp32 accumulators, buffers in flight, score blocks).
    """

    policy: str
    tokens: int
    params: float
    grads: float
    optimizer: float
    compute_copies: float
    activations: float
    head_and_loss: float
    recompute: float
    workspace: float
    attention_workspace: float
    host: float = 0.0  # offloaded activations in host memory

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.compute_copies

    @property
    def peak_bytes(self) -> float:
        backward = self.recompute + max(self.workspace, self.attention_workspace)
        return self.states + self.activations + max(self.head_and_loss, backward)

    def rows(self) -> list[tuple[str, float]]:
        """(label, bytes) of the breakdown; then the peak, and the host bytes (offload) outside it."""
        return [("parameters (fp32)", self.params), ("gradients (fp32)", self.grads),
                ("AdamW state (2 x fp32)", self.optimizer), ("compute copies", self.compute_copies),
                ("saved activations", self.activations), ("head + loss chunk", self.head_and_loss),
                ("recompute (1 block)", self.recompute), ("backward workspace", self.workspace),
                ("attention workspace", self.attention_workspace), ("peak", self.peak_bytes),
                ("host (offloaded)", self.host)]


def state_bytes(m: ModelConfig, lay: MemoryLayout) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer state, compute copies) per rank: fp32 master weights and
    gradients and AdamW's two fp32 moments sharded over ``state_shards``; bf16 copies of the gathered
    parameters (FSDP: the root's and about two blocks', plus one block's fp32 gradients before the
    reduce-scatter; autocast: a cached copy of every weight)."""
    vocab_params = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    hq, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    block = 2 * m.dim * (hq + kv) + 3 * m.dim * m.ffn_dim + 2 * m.dim
    total = m.n_layers * block + vocab_params + m.dim
    s = lay.state_shards
    copies = 0.0
    if lay.precision == "bf16":
        copies = 2.0 * (vocab_params + 2 * block) + 4.0 * block if s > 1 else 2.0 * total
    elif lay.precision == "autocast":
        copies = 2.0 * total
    return 4.0 * total / s, 4.0 * total / s, 8.0 * total / s, copies


def estimate_memory(m: ModelConfig, policy: str, tokens: int, lay: MemoryLayout) -> MemoryEstimate:
    """Peak per-rank bytes of a step whose micro-batch puts ``tokens`` tokens on this rank."""
    if m.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set to estimate memory (the LM head's size)")
    t, e, h, v = float(tokens), lay.elem, m.dim, m.vocab_size
    lb = layer_bytes(m, policy, lay)
    params, grads, optim, copies = state_bytes(m, lay)
    head = t * (8 * h + 4 + e * h + 8 + 4 + 8)  # final norm, its output, labels, lse, token ids
    chunk = min(t, lay.loss_chunk_tokens) if lay.loss_chunk_tokens > 0 else t
    # One chunk of logits in the compute dtype, in fp32 and logsumexp's fp32 temporary (the backward's
    # fp32 gradient and its compute-dtype copy are no more), the fp32 head-weight gradient and dh.
    loss = chunk * v * (8 + (0 if e == 4 else e)) + 4.0 * v * h + e * h * t
    score = 2.0 * lay.score_block_bytes if lay.attention == "reference" else 0.0  # scores and their gradient
    offloaded = max(0, m.n_layers - lay.keep_last) if policy in ("offload", "memo") else 0
    return MemoryEstimate(policy=policy, tokens=int(tokens), params=params, grads=grads, optimizer=optim,
                          compute_copies=copies, activations=resident_blocks(m.n_layers, offloaded, lay.depth) * lb.saved * t,
                          host=offloaded * lb.saved * t,
                          head_and_loss=head + loss,
                          recompute=lb.recompute * t, workspace=lb.workspace * t,
                          attention_workspace=lb.attention * t + score)


def resident_blocks(layers: int, offloaded: int, depth: int) -> int:
    """Blocks whose saved tensors are on the device at once when the first ``offloaded`` of ``layers``
    blocks offload with ``depth`` blocks of copies in flight (a block's offload completes when the
    block ``depth`` later starts its forward; its reload starts when the block above starts its
    backward). End of the forward: the kept blocks, plus the offloaded ones whose copies have not
    completed (the last ``depth - keep_last``). In the backward: the kept blocks, or the block running
    backward and the one being prefetched below it."""
    if offloaded <= 0:
        return layers
    kept = layers - offloaded
    forward_end = kept + min(offloaded, max(0, depth - kept))
    backward = max(kept, min(2, layers))
    return max(forward_end, backward)




def max_tokens(m: ModelConfig, policy: str, lay: MemoryLayout, device_bytes: float, limit: int = 1 << 34) -> int:
    """The most local tokens per micro-batch whose estimated peak fits ``device_bytes`` (0: none)."""
    if estimate_memory(m, policy, 1, lay).peak_bytes > device_bytes:
        return 0
    lo, hi = 1, 2
    while hi < limit and estimate_memory(m, policy, hi, lay).peak_bytes <= device_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the peak grows with the tokens: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate_memory(m, policy, mid, lay).peak_bytes <= device_bytes else (lo, mid)
    return lo



def precision_of(train_dtype: str, fsdp: bool, device_type: str) -> str:
    """The estimator's precision for ``train.dtype`` (auto: bf16 on CUDA) and ``parallel.fsdp``."""
    bf16 = train_dtype == "bf16" or (train_dtype == "auto" and device_type == "cuda")
    if not bf16:
        return "fp32"
    return "bf16" if fsdp else "autocast"


def attention_kind(kernels_attention: str, device_type: str) -> str:
    """``kernels.attention`` as the estimator sees it: ``reference`` keeps score blocks; so does CPU
    ``auto``/``sdpa_cpu`` for blocks that are not whole documents (ring shards); Triton does not."""
    if kernels_attention == "reference" or (device_type == "cpu" and kernels_attention in ("auto", "sdpa_cpu")):
        return "reference"
    return "flash"


def static_layout(algorithm_degrees: tuple[int, int], state_shards: int, precision: str, attention: str,
                  loss_chunk_tokens: int) -> MemoryLayout:
    """The layout of a static (ulysses, ring) SP mesh: ring, Ulysses, hybrid, or local at sp 1."""
    u, r = algorithm_degrees
    algorithm = "local" if u * r == 1 else "ring" if u == 1 else "ulysses" if r == 1 else "hybrid"
    return MemoryLayout(algorithm=algorithm, ulysses=u, ring=r, state_shards=state_shards, precision=precision,
                        attention=attention, loss_chunk_tokens=loss_chunk_tokens)
