"""Typed run configuration: dataclasses, YAML loading with ``base:`` inheritance, dotted overrides.

    cfg = load_config("configs/tiny-cpu.yaml", ["train.steps=20", "model.n_layers=2"])

Validation lives in the dataclasses (``__post_init__``) so programmatic users get the same
errors as the CLI. Every error is a :class:`ConfigError` with one line naming the key, what
was wrong and the allowed values (and a close match for typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to change."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed{hint}; choose one of {', '.join(map(repr, allowed))}")


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = ""  # empty -> runs/<name>
    seed: int = 1234

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, f"run.name={self.name!r} must be a non-empty name without '/'")
        if not self.output_dir:
            self.output_dir = os.path.join("runs", self.name)


@dataclass
class ModelConfig:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 -> n_heads (MHA)
    ffn_dim: int = 0  # 0 -> SwiGLU default: 8/3 * dim rounded up to a multiple of ffn_multiple_of
    ffn_multiple_of: int = 32
    vocab_size: int = 0  # 0 -> taken from the tokenizer / data store metadata
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1's frequency-dependent scaling of the RoPE frequencies)
    rope_factor: float = 8.0  # llama3: low frequencies slow down by this factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are scaled fully
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / high_freq_factor are kept
    rope_original_max_positions: int = 8192  # llama3: the context the frequencies were trained for
    head_dim: int = 0  # 0 -> dim / n_heads; Hugging Face models may set another (q/k/v width = heads x head_dim)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    init_std: float = 0.02
    init_from: str = ""  # a Hugging Face Llama directory (config.json + safetensors): its shapes and weights

    def __post_init__(self) -> None:
        for key in ("dim", "n_layers", "n_heads", "ffn_multiple_of"):
            _check(getattr(self, key) > 0, f"model.{key}={getattr(self, key)} must be positive")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        _check(
            self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}",
        )
        if self.head_dim == 0:
            _check(self.dim % self.n_heads == 0, f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads} "
                   "(or set model.head_dim)")
            self.head_dim = self.dim // self.n_heads
        _check(self.head_dim > 0 and self.head_dim % 2 == 0, f"model.head_dim={self.head_dim} must be positive and even for RoPE")
        _choice("model.rope_scaling", self.rope_scaling, ("none", "llama3"))
        if self.rope_scaling == "llama3":
            _check(self.rope_factor >= 1, f"model.rope_factor={self.rope_factor} must be >= 1")
            _check(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                   f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be positive and below "
                   f"model.rope_high_freq_factor={self.rope_high_freq_factor}")
            _check(self.rope_original_max_positions > 0,
                   f"model.rope_original_max_positions={self.rope_original_max_positions} must be positive")
        if self.ffn_dim == 0:
            hidden = int(8 * self.dim / 3)
            m = self.ffn_multiple_of
            self.ffn_dim = m * ((hidden + m - 1) // m)
        _check(self.ffn_dim > 0, f"model.ffn_dim={self.ffn_dim} must be positive")
        _check(self.vocab_size >= 0, f"model.vocab_size={self.vocab_size} must be >= 0 (0 = from the tokenizer)")
        _check(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be positive")

    @property
    def llama3_rope(self) -> tuple[float, float, float, int] | None:
        """(factor, low_freq_factor, high_freq_factor, original max positions) under llama3 scaling, else None."""
        if self.rope_scaling != "llama3":
            return None
        return self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_positions


DATA_MODES = ("concat_chunk", "pack", "decompose", "varlen")
CURRICULA = ("uniform", "grow_linear", "grow_p2")


@dataclass
class DataConfig:
    path: str = ""  # store prefix (PREFIX.bin/.idx), a blend "0.3 data/a 0.7 data/b" (or a YAML list of {weight, path}), or the output dir of `seqpar data decompose` for mode decompose
    mode: str = "pack"
    seq_len: int = 1024  # tokens per micro-batch stream before SP sharding (decompose: 2^max_log2 targets)
    tokens_per_step: int = 8192  # global tokens per optimizer step, all ranks and micro-batches
    doc_mask: bool = True  # concat_chunk only: false lets attention cross documents (classic baseline)
    tokenizer: str = "byte"  # "byte" or a local tokenizer.json; only used when the store has no metadata
    cache_dir: str = ""  # where the embedded corpus is built; empty -> $SEQPAR_CACHE or ~/.cache/seqpar
    curriculum: str = "grow_p2"  # decompose: uniform | grow_linear | grow_p2 | comma-separated odds, shortest bucket first
    curriculum_rule: str = "paper"  # decompose: paper (odds over non-empty buckets) | released (odds x token share)
    cycles: int = 1  # decompose: short-to-long cycles per epoch (the sawtooth)
    prefetch: bool = True  # build the next step's data in a background thread while this step trains

    def __post_init__(self) -> None:
        if len(self.path.split()) > 1:  # a blend "0.3 data/a 0.7 data/b" (or a path with spaces)
            from seqpar.data.blend import BlendError, parse_blend

            try:
                blend = parse_blend(self.path)
            except BlendError as e:
                raise ConfigError(str(e)) from None
            _check(blend is None or self.mode != "decompose", "data.mode=decompose takes one decomposition "
                   "directory, not a weighted data.path; use data.mode=pack, concat_chunk or varlen for a blend")
        _choice("data.mode", self.mode, DATA_MODES)
        _choice("data.curriculum_rule", self.curriculum_rule, ("paper", "released"))
        _check(self.cycles >= 1, f"data.cycles={self.cycles} must be >= 1")
        if self.curriculum not in CURRICULA:
            try:
                odds = [float(x) for x in self.curriculum.split(",")]
            except ValueError:
                odds = []
            _check(
                bool(odds) and all(o >= 0 for o in odds) and any(o > 0 for o in odds),
                f"data.curriculum={self.curriculum!r} must be one of {', '.join(CURRICULA)} or comma-separated odds like '6,5,4,3,2,1'",
            )
        if self.mode == "decompose":
            _check(bool(self.path), "data.mode=decompose needs data.path: the output directory of 'seqpar data decompose STORE --output DIR'")
        _check(self.seq_len >= 2, f"data.seq_len={self.seq_len} must be >= 2")
        _check(
            self.tokens_per_step >= self.seq_len and self.tokens_per_step % self.seq_len == 0,
            f"data.tokens_per_step={self.tokens_per_step} must be a positive multiple of data.seq_len={self.seq_len}",
        )

    @property
    def streams_per_step(self) -> int:
        return self.tokens_per_step // self.seq_len

    def curriculum_odds(self) -> str | list[float]:
        return self.curriculum if self.curriculum in CURRICULA else [float(x) for x in self.curriculum.split(",")]


@dataclass
class ParallelConfig:
    dp: int = -1  # -1 -> world_size / sp
    sp: int = 1
    ulysses: int = 1
    ring: int = 1
    algorithm: str = "auto"  # ring | ulysses | hybrid | adaptive (per-micro-batch groups, see scatter); auto picks from the degrees
    layout: str = "auto"  # zigzag | contiguous; auto: contiguous for ulysses, zigzag for ring and hybrid
    fsdp: bool = True  # shard parameters, gradients and optimizer state over dp x sp; false replicates
    timeout_s: float = 600.0  # collective timeout: a dead rank fails the job instead of hanging it (NCCL: + heartbeat)
    flight_recorder: int = 0  # NCCL: keep each rank's last N collectives, dumped to RUN_DIR/flight_recorder/ on a timeout

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, f"parallel.timeout_s={self.timeout_s} must be positive")
        _check(self.flight_recorder >= 0, f"parallel.flight_recorder={self.flight_recorder} must be >= 0 (0: off)")
        _check(self.dp == -1 or self.dp >= 1, f"parallel.dp={self.dp} must be >= 1, or -1 to fill the world size")
        for key in ("sp", "ulysses", "ring"):
            _check(getattr(self, key) >= 1, f"parallel.{key}={getattr(self, key)} must be >= 1")
        _check(
            self.sp == self.ulysses * self.ring,
            f"parallel.sp={self.sp} must equal parallel.ulysses({self.ulysses}) x parallel.ring({self.ring}) = {self.ulysses * self.ring}",
        )
        _choice("parallel.algorithm", self.algorithm, ("auto", "ring", "ulysses", "hybrid", "adaptive"))
        _choice("parallel.layout", self.layout, ("auto", "zigzag", "contiguous"))
        if self.algorithm == "adaptive":
            # One pool over the whole world (FlexSP): the planner picks degrees and algorithms per
            # micro-batch, so sp / ulysses / ring / layout are not used.
            _check(self.dp in (-1, 1), f"parallel.algorithm=adaptive runs the whole world as one pool and needs parallel.dp=1, "
                                       f"got parallel.dp={self.dp}; set parallel.dp=1 (the planner chooses the group sizes)")
            self.dp = 1
            return
        if self.algorithm == "auto":
            self.algorithm = "hybrid" if self.ulysses > 1 and self.ring > 1 else "ulysses" if self.ulysses > 1 else "ring"
        rule = {
            "ring": (self.ulysses == 1, "parallel.ulysses=1 (all of sp on the ring)"),
            "ulysses": (self.ring == 1, "parallel.ring=1 (all of sp in the all-to-all)"),
            "hybrid": (self.ulysses > 1 and self.ring > 1, "parallel.ulysses > 1 and parallel.ring > 1"),
        }
        ok, need = rule[self.algorithm]
        _check(
            ok,
            f"parallel.algorithm={self.algorithm} does not agree with ulysses={self.ulysses}, ring={self.ring}: it needs {need}; "
            "fix the degrees or the algorithm (or use algorithm=auto)",
        )
        if self.layout == "auto":
            self.layout = "contiguous" if self.algorithm == "ulysses" else "zigzag"


SCATTER_ALGORITHMS = ("ulysses", "ring", "hybrid")


@dataclass
class ScatterConfig:
    """Adaptive scattering (``parallel.algorithm: adaptive``); see specs/adaptive-scattering.md."""

    profile: str = "auto"  # cost-model profile: auto (this device's `seqpar profile` fit, else its hardware profile), a name or a YAML path
    time_limit_s: float = 1.0  # planner wall-clock budget per step (hidden behind the previous step)
    algorithms: str = "ulysses,ring,hybrid"  # comma-separated, allowed among ulysses, ring, hybrid
    allow_degree1: bool = True  # groups of one rank (local attention, no communication)
    capacity_tokens: int = 0  # K tokens per rank; 0: from the memory model (seqpar.scatter.capacity)
    static_degree: int = 0  # 0: adaptive plans; d: the static baseline through the executor (every group of degree d, best-fit packing)

    def __post_init__(self) -> None:
        _check(self.time_limit_s >= 0, f"scatter.time_limit_s={self.time_limit_s} must be >= 0 seconds")
        _check(self.static_degree >= 0 and self.static_degree & (self.static_degree - 1) == 0,
               f"scatter.static_degree={self.static_degree} must be 0 (adaptive) or a power of two")
        _check(self.capacity_tokens >= 0, f"scatter.capacity_tokens={self.capacity_tokens} must be >= 0 (0: from the memory model)")
        names = [a.strip() for a in self.algorithms.split(",") if a.strip()]
        _check(bool(names), f"scatter.algorithms={self.algorithms!r} must name at least one of {', '.join(SCATTER_ALGORITHMS)}")
        for a in names:
            _choice("scatter.algorithms", a, SCATTER_ALGORITHMS)
        self.algorithms = ",".join(dict.fromkeys(names))

    @property
    def algorithm_list(self) -> tuple[str, ...]:
        return tuple(self.algorithms.split(","))


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    on_nan: str = "stop"  # a NaN/inf loss or grad norm: stop the run, or skip the step

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        _check(self.lr > 0, f"train.lr={self.lr} must be positive")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        _choice("train.dtype", self.dtype, ("auto", "fp32", "bf16"))
        _choice("train.on_nan", self.on_nan, ("stop", "skip"))


@dataclass
class LoggingConfig:
    log_every: int = 1
    progress: bool = True  # progress bar for long preprocessing
    tensorboard: bool = False  # also write TensorBoard scalars to RUN_DIR/tensorboard (needs tensorboard installed)

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, f"logging.log_every={self.log_every} must be >= 1")


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps (0: only at the end and on SIGTERM/SIGUSR1)
    keep_latest: int = 2  # complete checkpoints kept; older ones are deleted
    resume: bool = True  # resume from the newest complete checkpoint in RUN_DIR/checkpoints
    save_final: bool = True

    def __post_init__(self) -> None:
        _check(self.interval >= 0, f"checkpoint.interval={self.interval} must be >= 0 (0: only at the end)")
        _check(self.keep_latest >= 1, f"checkpoint.keep_latest={self.keep_latest} must be >= 1")


@dataclass
class ClusterConfig:
    profile: str = "auto"  # hardware profile for MFU: auto (detect), a name in cluster/profiles, or a YAML path


#: Values of ``memory.policy``.
MEMORY_POLICIES: tuple[str, ...] = ("none", "full", "selective", "offload", "memo")


@dataclass
class MemoryConfig:
    #: Activation memory policy (``seqpar.memory.checkpoint``): none | full (whole-block recompute) |
    #: selective (save attention's inputs and output, recompute only the token-local ops) | offload
    #: (saved tensors to host memory, all blocks but the last ``keep_last``) | memo (offload, with the
    #: token-local ops of the last 1 - ``alpha`` of each rank's tokens recomputed; attention never).
    policy: str = "none"
    loss_chunk_tokens: int = 4096  # the LM head and loss run over chunks of this many tokens (0: one chunk)
    keep_last: int = 2  # offload, memo: the last blocks keep their saved tensors (their backward starts at once)
    #: memo: share of each rank's tokens whose token-local tensors are kept (offloaded), 0..1, or auto
    #: (MEMO's LP at start-up: the largest alpha whose offload hides under a block's forward at the
    #: measured host bandwidth and fits ``host_budget_gib``).
    alpha: float | str = "auto"
    host_budget_gib: float = 0.0  # memo auto: host memory per rank for offloaded activations (0: available / local ranks)
    depth: int = 1  # offload, memo: blocks of copies in flight (a block's offload completes before block + depth starts)

    def __post_init__(self) -> None:
        _choice("memory.policy", self.policy, MEMORY_POLICIES)
        _check(self.keep_last >= 0, f"memory.keep_last={self.keep_last} must be >= 0")
        _check(self.alpha == "auto" or (not isinstance(self.alpha, str) and 0.0 <= self.alpha <= 1.0),
               f"memory.alpha={self.alpha!r} must be auto or a number in [0, 1]")
        _check(self.host_budget_gib >= 0, f"memory.host_budget_gib={self.host_budget_gib} must be >= 0 (0: available memory)")
        _check(self.depth >= 1, f"memory.depth={self.depth} must be >= 1")
        _check(self.loss_chunk_tokens >= 0, f"memory.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: one chunk)")


@dataclass
class KernelsConfig:
    attention: str = "auto"

    def __post_init__(self) -> None:
        _choice("kernels.attention", self.attention, ("auto", "triton", "reference", "sdpa_cpu"))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scatter: ScatterConfig = field(default_factory=ScatterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def parallel_dims(self, world_size: int):
        """Validate the rules that need the world size and return the run's ``ParallelDims``.

        The trainer, ``--dry-run`` and programmatic users all call this one method: parallel
        degrees against the world (ParallelDimsError), Ulysses head splitting (ConfigError), and
        the step's streams over dp (ConfigError); one line each.
        """
        from seqpar.parallel.dims import ParallelDims

        p = self.parallel
        if self.adaptive:  # one pool of the whole world; groups are chosen per micro-batch
            return ParallelDims(1, world_size, 1, world_size, world_size)
        dims = ParallelDims(p.dp, p.sp, p.ulysses, p.ring, world_size)
        check_sp_heads(self.model, dims.ulysses)
        micro_batches_per_rank(self.data, dims.dp)
        return dims

    @property
    def adaptive(self) -> bool:
        return self.parallel.algorithm == "adaptive"

    def __post_init__(self) -> None:
        if self.model.activation_checkpointing:  # the older spelling of memory.policy=full
            if self.memory.policy == "none":
                self.memory.policy = "full"
            elif self.memory.policy != "full":
                raise ConfigError(f"model.activation_checkpointing=true means memory.policy=full, but memory.policy="
                                  f"{self.memory.policy}; drop model.activation_checkpointing")
        if self.adaptive and self.data.mode != "varlen":
            raise ConfigError(f"parallel.algorithm=adaptive plans whole sequences per step and needs data.mode=varlen, "
                              f"got data.mode={self.data.mode}; set data.mode=varlen")


def check_sp_heads(model_cfg: ModelConfig, ulysses: int) -> None:
    """Ulysses's head rule (``seqpar.parallel.dims.ulysses_head_error``) as a one-line ConfigError."""
    from seqpar.parallel.dims import ulysses_head_error

    err = ulysses_head_error(model_cfg.n_heads, model_cfg.n_kv_heads, ulysses)
    if err:
        raise ConfigError(err)


def micro_batches_per_rank(data_cfg: DataConfig, dp: int) -> int:
    """Streams (micro-batches) each dp rank runs per optimizer step; ConfigError when they do not split."""
    streams = data_cfg.streams_per_step
    if data_cfg.mode == "varlen":  # the stream count varies per step; padded with empty streams to split over dp
        return -(-streams // dp)
    if streams % dp != 0:
        raise ConfigError(
            f"data.tokens_per_step={data_cfg.tokens_per_step} holds {streams} streams of "
            f"data.seq_len={data_cfg.seq_len}, which does not split over dp={dp} ranks; "
            f"make data.tokens_per_step a multiple of {data_cfg.seq_len * dp}"
        )
    return streams // dp


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with key and type checking.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the field type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        _choice(key, value, typing.get_args(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be a bool (true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def _unknown_key(key: str, name: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean '{parent}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; allowed here: {', '.join(allowed)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key, str(name), list(fields))
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict (as read from YAML)."""
    return _build(Config, _with_blend_string(_with_init_from(data)), "")


def _with_blend_string(data: dict) -> dict:
    """``data.path`` as a YAML list of ``{weight, path}`` -> Megatron's "0.3 data/a 0.7 data/b"."""
    d = data.get("data")
    if not isinstance(d, dict) or not isinstance(d.get("path"), list):
        return data
    from seqpar.data.blend import BlendError, blend_from_list

    try:
        return {**data, "data": {**d, "path": blend_from_list(d["path"])}}
    except BlendError as e:
        raise ConfigError(str(e)) from None


def _with_init_from(data: dict) -> dict:
    """``model.init_from: PATH``: the model's shapes come from PATH/config.json (a Hugging Face
    Llama); a key the run sets to another value is an error, not silently overridden."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("init_from"):
        return data
    from seqpar.model.hf import HFConfigError, model_keys, read_hf_config

    path = str(model["init_from"])
    try:
        keys = model_keys(read_hf_config(path), os.path.join(path, "config.json"))
    except HFConfigError as e:
        raise ConfigError(f"model.init_from={path!r}: {e}") from None
    for key, value in keys.items():
        if key in model and model[key] not in ("", None) and _coerce(f"model.{key}", model[key], type(value)) != value:
            raise ConfigError(f"model.{key}={model[key]!r} conflicts with model.init_from={path!r} ({key} {value!r} "
                              f"in its config.json); remove model.{key} from the run's config")
    return {**data, "model": {**model, **keys}}


# ---------------------------------------------------------------------------------------------
# YAML files, inheritance and overrides.


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config 'base:' chain loops back to {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base:
        bases = base if isinstance(base, list) else [base]
        merged: dict = {}
        for b in bases:
            bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
            merged = _deep_merge(merged, _read_yaml(bpath, seen + (path,)))
        data = _deep_merge(merged, data)
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (following ``base:``), apply dotted overrides and validate."""
    data = _read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
