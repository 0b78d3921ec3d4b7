"""Model presets and sequence-length workloads for the planner (pure, numpy only).

    model = resolve_model("gpt-7b")                         # or a config YAML path (its model: section)
    lengths = synthetic_lengths("wikipedia", n=512, seed=0) # int64 [512]
    batches = split_batches(lengths, batch_size=512)

Synthetic long-tail families. Lengths are tokens, clipped to [min_len, max_len]. The mixes are
*modelled on* FlexSP's qualitative descriptions (Fig. 1 / Sec. 2 of the paper: all three are
long-tailed; GitHub has the largest share of long sequences, CommonCrawl sits between, and
Wikipedia is overwhelmingly short with the most extreme tail); the numbers below are our
choices, not measured statistics of those corpora:
- ``lognormal``: median 4K tokens, sigma 1.4.
- ``pareto``: x_min 1K tokens, tail index alpha 1.1 (mean dominated by the tail).
- ``github``: 80% log-normal (median 3K, sigma 1.2) + 20% Pareto (x_min 16K, alpha 1.0).
- ``commoncrawl``: 92% log-normal (median 1.5K, sigma 1.0) + 8% Pareto (x_min 16K, alpha 1.1).
- ``wikipedia``: 97% log-normal (median 700, sigma 1.0) + 3% Pareto (x_min 32K, alpha 0.8).
"""

from __future__ import annotations

import os

import numpy as np

from seqpar.config import ModelConfig

#: FlexSP's GPT models (GPT-7B / 13B / 30B shapes; SwiGLU 8/3 h has the GPT 4h MLP's parameters)
#: and a Llama-3.2-1B-shaped model (as configs/llama-1b-128k.yaml).
MODEL_PRESETS: dict[str, dict] = {
    "gpt-7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 50257},
    "gpt-13b": {"dim": 5120, "n_layers": 40, "n_heads": 40, "vocab_size": 50257},
    "gpt-30b": {"dim": 6656, "n_layers": 60, "n_heads": 52, "vocab_size": 50257},
    "llama-1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 8192, "vocab_size": 128256},
}

FAMILIES: tuple[str, ...] = ("lognormal", "pareto", "github", "commoncrawl", "wikipedia")
#: The three paper-modelled families used for the headline comparison.
PAPER_FAMILIES: tuple[str, ...] = ("github", "commoncrawl", "wikipedia")


def resolve_model(spec: str) -> ModelConfig:
    """A preset name (gpt-7b, gpt-13b, gpt-30b, llama-1b) or a config YAML path (its ``model:`` section)."""
    if spec in MODEL_PRESETS:
        return ModelConfig(**MODEL_PRESETS[spec])
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        if not os.path.isfile(spec):
            raise ValueError(f"--model {spec!r}: no such config file; pass a YAML path or one of {', '.join(MODEL_PRESETS)}")
        from seqpar.config import load_config

        return load_config(spec).model
    raise ValueError(f"--model {spec!r} is unknown; choose one of {', '.join(MODEL_PRESETS)} or pass a config YAML path")


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float) -> np.ndarray:
    return rng.lognormal(np.log(median), sigma, n)


def _pareto(rng: np.random.Generator, n: int, x_min: float, alpha: float) -> np.ndarray:
    return x_min * (1.0 + rng.pareto(alpha, n))


def _mix(rng: np.random.Generator, n: int, share_tail: float, body: tuple, tail: tuple) -> np.ndarray:
    is_tail = rng.random(n) < share_tail
    out = _lognormal(rng, n, *body)
    out[is_tail] = _pareto(rng, int(is_tail.sum()), *tail)
    return out


def synthetic_lengths(family: str, n: int = 512, seed: int = 0, max_len: int = 196_608, min_len: int = 64) -> np.ndarray:
    """``n`` lengths (int64 tokens) from one family; see the module doc for the distributions."""
    rng = np.random.default_rng(seed)
    if family == "lognormal":
        x = _lognormal(rng, n, 4096, 1.4)
    elif family == "pareto":
        x = _pareto(rng, n, 1024, 1.1)
    elif family == "github":
        x = _mix(rng, n, 0.20, (3072, 1.2), (16384, 1.0))
    elif family == "commoncrawl":
        x = _mix(rng, n, 0.08, (1536, 1.0), (16384, 1.1))
    elif family == "wikipedia":
        x = _mix(rng, n, 0.03, (700, 1.0), (32768, 0.8))
    else:
        raise ValueError(f"--dist {family!r} is unknown; choose one of {', '.join(FAMILIES)}")
    return np.clip(np.rint(x), min_len, max_len).astype(np.int64)


def read_lengths(path: str) -> np.ndarray:
    """One positive integer length per line (blank lines and # comments ignored)."""
    out = []
    with open(path) as f:
        for no, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                out.append(int(text))
            except ValueError:
                raise ValueError(f"{path}:{no}: {text!r} is not an integer; write one token count per line") from None
    return np.asarray(out, dtype=np.int64)


def sample_batches(lengths: np.ndarray, batch_size: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    """``steps`` batches of ``batch_size`` lengths drawn without replacement (with, if too few)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return [lengths]
    replace = lengths.size < batch_size * steps
    pick = rng.choice(lengths.size, size=batch_size * steps, replace=replace)
    return [lengths[pick[k * batch_size:(k + 1) * batch_size]] for k in range(steps)]
