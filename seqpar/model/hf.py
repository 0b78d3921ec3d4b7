"""Hugging Face Llama checkpoints in and out, on ``safetensors`` alone (no ``transformers`` at run time).

    model = load_pretrained("path/to/Llama-3.2-1B")      # config.json + model.safetensors (or a sharded index)
    save_pretrained(model, "out/")                        # loads in transformers' LlamaForCausalLM

Covers the Llama / Llama 3 family: GQA, ``rope_theta``, RoPE scaling ``default`` or ``llama3`` given as
``rope_scaling`` (transformers 4.x) or ``rope_parameters`` (5.x), tied or untied embeddings,
``rms_norm_eps`` and an explicit ``head_dim``. Anything else (biases, other RoPE types, other
architectures) is a one-line ``HFConfigError`` naming the field. seqpar's RoPE rotates half-split
pairs, as Hugging Face's does, so q and k need no permutation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from seqpar.config import ModelConfig

#: seqpar parameter name -> Hugging Face name; ``{i}`` is the layer.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
#: The largest safetensors file ``save_pretrained`` writes before it shards (transformers' default).
MAX_SHARD_BYTES = 5 * 2**30


class HFConfigError(ValueError):
    """A Hugging Face config seqpar cannot load; one line naming the field."""


def hf_name(name: str) -> str:
    """seqpar's parameter name -> the Hugging Face one (``layers.3.attention.wq.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{_LAYER_NAMES[rest]}"


def _rope(hf: dict, where: str) -> dict:
    """The model keys of RoPE from ``rope_parameters`` (5.x) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
    params = hf.get("rope_parameters") or {}
    scaling = params if params else (hf.get("rope_scaling") or {})
    field = "rope_parameters" if params else "rope_scaling"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    out: dict = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind != "llama3":
        raise HFConfigError(f"{where}: {field}.rope_type={kind!r} is not supported (seqpar has 'default' and 'llama3')")
    try:
        return out | {"rope_scaling": "llama3", "rope_factor": float(scaling["factor"]),
                      "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                      "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                      "rope_original_max_positions": int(scaling["original_max_position_embeddings"])}
    except KeyError as e:
        raise HFConfigError(f"{where}: {field} of type llama3 lacks {e.args[0]!r}") from None


def model_keys(hf: dict, where: str = "config.json") -> dict:
    """seqpar ``model.*`` keys from a Hugging Face ``config.json`` (pure; HFConfigError otherwise)."""
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in arch:
        raise HFConfigError(f"{where}: architectures={arch} / model_type={hf.get('model_type')!r} is not a Llama "
                            "(seqpar loads LlamaForCausalLM checkpoints)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFConfigError(f"{where}: {key}=true is not supported (seqpar's Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConfigError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    try:
        heads = int(hf["num_attention_heads"])
        keys = {
            "dim": int(hf["hidden_size"]),
            "n_layers": int(hf["num_hidden_layers"]),
            "n_heads": heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "ffn_dim": int(hf["intermediate_size"]),
            "vocab_size": int(hf["vocab_size"]),
            "head_dim": int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        }
    except KeyError as e:
        raise HFConfigError(f"{where}: {e.args[0]!r} is missing") from None
    return keys | _rope(hf, where)


def read_hf_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise HFConfigError(f"{file} not found: model.init_from / load_pretrained need a Hugging Face model directory")
    with open(file) as f:
        return json.load(f)


def hf_config(m: ModelConfig) -> dict:
    """The ``config.json`` of a seqpar model, as ``transformers`` 5.x writes it (4.x reads it too:
    ``rope_theta`` and ``rope_scaling`` are written as well)."""
    rope: dict = {"rope_theta": m.rope_theta, "rope_type": "default"}
    if m.llama3_rope is not None:
        factor, low, high, original = m.llama3_rope
        rope = {"rope_theta": m.rope_theta, "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": original}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
        "hidden_size": m.dim, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "intermediate_size": m.ffn_dim,
        "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "rope_parameters": rope, "rope_theta": m.rope_theta,
        "rope_scaling": None if m.llama3_rope is None else rope,
        "max_position_embeddings": max(m.rope_original_max_positions, 8192), "dtype": "float32",
    }


def weight_files(path: str) -> dict[str, str]:
    """Hugging Face tensor name -> the safetensors file that holds it (single file or sharded index)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise HFConfigError(f"{path}: neither model.safetensors nor model.safetensors.index.json (only safetensors are read)")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def read_tensors(path: str, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for ``names``, each file opened once (memory-mapped by safetensors)."""
    from safetensors import safe_open

    files = weight_files(path)
    missing = [n for n in names if n not in files]
    if missing:
        raise HFConfigError(f"{path}: the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing)")
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for file, ns in by_file.items():
        with safe_open(file, framework="pt") as f:
            for n in ns:
                yield n, f.get_tensor(n)


def load_pretrained(path: str, attention=None, dtype: torch.dtype = torch.float32):
    """A seqpar ``Transformer`` with the weights of the Hugging Face Llama in ``path`` (on the CPU,
    ``dtype``). ``attention``: the model's attention function (default: the reference kernel)."""
    from seqpar.attention import build_attention
    from seqpar.model.llama import Transformer

    cfg = ModelConfig(**model_keys(read_hf_config(path), os.path.join(path, "config.json")))
    with torch.device("meta"):
        model = Transformer(cfg, attention or build_attention("reference", torch.device("cpu")))
    ours = {hf_name(n): n for n in model.state_dict() if not (cfg.tie_embeddings and n == "output.weight")}
    state = {ours[name]: tensor.to(dtype) for name, tensor in read_tensors(path, list(ours))}
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def save_pretrained(model, path: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write ``config.json`` and safetensors (one file, or shards with ``model.safetensors.index.json``
    above ``max_shard_bytes``) that ``transformers``' ``LlamaForCausalLM.from_pretrained`` loads.
    Tied embeddings are written once. Returns the files written."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.cfg
    tensors = {hf_name(n): t.detach().contiguous().cpu() for n, t in model.state_dict().items()
               if not (cfg.tie_embeddings and n == "output.weight")}
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    written = []
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: file for file, shard in zip(names, shards) for n in shard}}
        _write_json(os.path.join(path, "model.safetensors.index.json"), index)
        written.append("model.safetensors.index.json")
    for file, shard in zip(names, shards):
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        written.append(file)
    _write_json(os.path.join(path, "config.json"), hf_config(cfg))
    return written + ["config.json"]


def _write_json(file: str, obj: dict) -> None:
    tmp = f"{file}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, file)


def load_checkpoint_model(checkpoint: str):
    """A seqpar ``Transformer`` (CPU, fp32) with the weights of a training checkpoint
    (``RUN_DIR/checkpoints/step_N``, or a run directory: its newest), read in one process from the
    DCP files whatever layout wrote them."""
    import torch.distributed.checkpoint as dcp

    from seqpar.attention import build_attention
    from seqpar.model.llama import Transformer

    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):  # a run directory
        from seqpar.train.checkpoint import Checkpointer

        newest = Checkpointer(checkpoint, keep_latest=1).latest()
        if newest is None:
            raise HFConfigError(f"{checkpoint}/checkpoints holds no complete checkpoint")
        checkpoint = newest
    meta_file = os.path.join(checkpoint, "meta.json")
    if not os.path.isfile(meta_file):
        raise HFConfigError(f"{checkpoint} is not a seqpar checkpoint (no meta.json): pass RUN_DIR/checkpoints/step_N")
    with open(meta_file) as f:
        cfg = ModelConfig(**json.load(f)["config"]["model"])
    with torch.device("meta"):
        model = Transformer(cfg, build_attention("reference", torch.device("cpu")))
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load({"model": model.state_dict()}, checkpoint_id=checkpoint, no_dist=True)
    return model


@torch.no_grad()
def load_rows(model, path: str) -> int:
    """Fill ``model``'s parameters (plain, or FSDP2 ``Shard(0)`` / ``Replicate`` DTensors, already
    allocated) from the Hugging Face checkpoint in ``path``: each rank reads only its own rows of
    each tensor (``safe_open(...).get_slice``), so no rank ever holds a full copy. Returns the
    elements read. Not collective."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from seqpar.model.init import canonical_name, local_rows

    files = weight_files(path)
    read = 0
    with ExitStack() as stack:
        opened: dict = {}
        for raw, p in model.named_parameters():  # a tied parameter comes once, under its first name
            name = hf_name(canonical_name(raw))
            if name not in files:
                raise HFConfigError(f"{path}: the checkpoint has no tensor {name!r}")
            if files[name] not in opened:
                opened[files[name]] = stack.enter_context(safe_open(files[name], framework="pt"))
            sl = opened[files[name]].get_slice(name)
            if list(sl.get_shape()) != list(p.shape):
                raise HFConfigError(f"{path}: {name} has shape {list(sl.get_shape())}, the model {list(p.shape)}")
            local = p.to_local() if isinstance(p, DTensor) else p
            if local.numel() == 0:
                continue
            lo, hi = local_rows(p)
            local.copy_(sl[lo:hi])
            read += local.numel()
    return read
