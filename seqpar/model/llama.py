"""Llama-style decoder on packed token streams: RMSNorm, RoPE (fp32), SwiGLU, GQA.

Every layer except attention is token-local, so the model runs unchanged on a rank's shard of
a stream; attention is an injected :class:`~seqpar.attention.AttentionFn` chosen by config.

    model = Transformer(cfg.model, attention=build_attention("auto", device))
    logits = model(tokens, positions, ctx)   # tokens: [T] int64 -> logits: [T, vocab] fp32
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.attention.context import AttentionFn, AttnContext
from seqpar.config import ModelConfig
from seqpar.model.init import InitRule, init_parameters


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32: bf16 mean-of-squares loses the small components.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, llama3: tuple[float, float, float, int] | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """RoPE's frequencies [head_dim / 2] fp64; with ``llama3`` = (factor, low_freq_factor,
    high_freq_factor, original max positions), Llama 3.1's scaling: wavelengths longer than
    original / low_freq_factor slow down by ``factor``, shorter than original / high_freq_factor stay,
    and those between are interpolated smoothly."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    if llama3 is None:
        return inv_freq
    factor, low, high, original = llama3
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: fully scaled, 1: kept
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > original / low, inv_freq / factor, torch.where(wavelen < original / high, inv_freq, scaled))


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                llama3: tuple[float, float, float, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables for the given positions: [T] int -> two fp32 tensors [T, head_dim / 2]
    (computed in fp64; ``llama3``: see ``rope_inv_freq``)."""
    inv_freq = rope_inv_freq(head_dim, theta, llama3, positions.device)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate half-split pairs of x: [T, heads, head_dim] in fp32, returned in x.dtype."""
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: AttentionFn) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attention = attention

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-local projections and RoPE: x [T, dim] -> q [T, heads, hd], k, v [T, kv_heads, hd]."""
        t = x.shape[0]
        q = self.wq(x).view(t, self.n_heads, self.head_dim)
        k = self.wk(x).view(t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(t, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """Output projection of attention's output [T, heads, hd] -> [T, dim]."""
        return self.wo(out.reshape(out.shape[0], self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return self.project_out(self.attention(*self.qkv(x, cos, sin), ctx))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: AttentionFn) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, attention)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    # The block in three stages: token-local before attention, attention (the only op that mixes
    # tokens, and the only one that communicates under SP), token-local after it. Memory policies
    # (seqpar.memory.policies) run the token-local stages under recomputation and attention once.
    def pre_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, dim] (the block input) -> q, k, v after the norm, projections and RoPE."""
        return self.attention.qkv(self.attention_norm(x), cos, sin)

    def post_attention(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The block input x [T, dim] and attention's output [T, heads, hd] -> the block output [T, dim]."""
        x = x + self.attention.project_out(out)
        return x + self.feed_forward(self.ffn_norm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return self.post_attention(x, self.attention.attention(*self.pre_attention(x, cos, sin), ctx))


class Transformer(nn.Module):
    """Decoder over a packed stream (or a rank's shard of one).

    forward(tokens [T] int64, ctx) -> logits [T, vocab_size] fp32, where ctx carries the
    tokens' global positions and document ids (computed on the global stream before sharding).
    """

    def __init__(self, cfg: ModelConfig, attention: AttentionFn) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the trainer fills it from the tokenizer)")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, attention) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if not self.tok_embeddings.weight.is_meta:  # built under torch.device("meta"): init after sharding
            self.reset_parameters()

    def init_rule(self, name: str, shape: tuple[int, ...]) -> InitRule:
        """Distribution of parameter ``name``: norms' 1-D weights ones; residual-branch outputs
        (``wo``, ``w2``) normal(init_std / sqrt(2 n_layers)), GPT-2 style so the stream's variance
        stays O(1) with depth; everything else normal(init_std)."""
        if len(shape) == 1:
            return InitRule.ones()
        if name.endswith(("wo.weight", "w2.weight")):
            return InitRule.normal(self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers))
        return InitRule.normal(self.cfg.init_std)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every parameter (plain or sharded) from ``seed`` (default: the seed last given
        to ``torch.manual_seed``); values do not depend on the layout. See seqpar.model.init."""
        init_parameters(self, seed if seed is not None else torch.initial_seed(), self.init_rule)

    #: Tokens per chunk of the LM head and loss when ``forward`` gets labels (0: one chunk); set from
    #: outside (``memory.loss_chunk_tokens``), like every memory policy.
    loss_chunk_tokens: int = 0

    def forward(self, tokens: torch.Tensor, ctx: AttnContext, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [T, vocab] fp32, or with ``labels`` ([T] int64, -100: no target) the fp32 sum of
        token cross-entropy computed over token chunks (``seqpar.memory.chunked_loss``), so the
        full logits never exist."""
        cos, sin = rope_tables(ctx.positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.llama3_rope)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:  # memory policies (activation checkpointing) are applied from outside
            x = layer(x, cos, sin, ctx)
        h = self.norm(x)
        if labels is None:
            return self.output(h).float()
        from seqpar.memory.chunked_loss import chunked_head_loss

        return chunked_head_loss(h, self.output.weight, labels, self.loss_chunk_tokens)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over tokens with a target (labels == -100 are ignored), fp32.

    logits: [T, vocab] fp32; labels: [T] int64. Divide by the step's global target count.
    """
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
