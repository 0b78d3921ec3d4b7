"""Training FLOPs of the decoder, counting causal attention per document (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from seqpar.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls per token (embedding lookup excluded, LM head included)."""
    d, hd = cfg.dim, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    mlp = 3 * d * cfg.ffn_dim
    return cfg.n_layers * (attn + mlp) + d * cfg.vocab_size


def attention_pairs(doc_lengths: Sequence[int], causal: bool = True) -> int:
    """Visible (query, key) pairs of a packed stream: sum over documents of L(L+1)/2 (causal) or L^2."""
    if causal:
        return sum(int(n) * (int(n) + 1) // 2 for n in doc_lengths)
    return sum(int(n) * int(n) for n in doc_lengths)


def train_flops(cfg: ModelConfig, doc_lengths: Sequence[int], causal: bool = True) -> float:
    """Forward + backward FLOPs of one stream made of documents of these lengths.

    Linear layers: 6 x matmul params per token (2 forward, 4 backward). Attention: QK^T and PV
    each 2 x heads x head_dim FLOPs per visible pair forward, times 3 for forward + backward.
    Recomputation (activation checkpointing) is not counted: this is model FLOPs, as in MFU.
    """
    tokens = sum(int(n) for n in doc_lengths)
    linear = 6 * matmul_params(cfg) * tokens
    attn = 3 * 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * attention_pairs(doc_lengths, causal)
    return float(linear + attn)


def flops_per_token(cfg: ModelConfig, doc_lengths: Sequence[int], causal: bool = True) -> float:
    tokens = sum(int(n) for n in doc_lengths)
    return train_flops(cfg, doc_lengths, causal) / max(tokens, 1)
