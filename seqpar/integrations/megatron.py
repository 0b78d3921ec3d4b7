"""seqpar's ring, Ulysses and hybrid attention as megatron-core's core attention.

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from seqpar.integrations.megatron import SeqparCoreAttention, megatron_thd_shard

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = SeqparCoreAttention
    model = GPTModel(config, spec, vocab_size, max_sequence_length)       # config.context_parallel_size = cp
    batch = megatron_thd_shard(tokens, cu_seqlens, cp, cp_rank, cp_group)  # this rank's tokens + PackedSeqParams
    loss = model(batch.input_ids, batch.position_ids, None, labels=batch.labels,
                 packed_seq_params=batch.packed_seq_params)

Megatron's own context parallelism needs TransformerEngine; this module needs only torch. The
algorithm follows Megatron's ``cp_comm_type``: ``p2p`` -> ring, ``a2a`` -> Ulysses, ``a2a+p2p`` ->
hybrid over Megatron's hierarchical CP groups (``hierarchical_context_parallel_sizes`` =
[Ulysses, ring]: Megatron's first level is adjacent ranks, as seqpar's Ulysses groups are); or it is
forced with ``functools.partial(SeqparCoreAttention, algorithm="ulysses")``.

The token layout is Megatron's (``seqpar.attention.layout.megatron_cp_layout``): every document
padded to a multiple of 2 x cp, rank r holding chunks r and 2cp-1-r, because Megatron has already
applied RoPE for those positions before core attention runs. Pad tokens form documents of their
own, so no real token attends to them. Process groups come from Megatron (``pg_collection.cp`` /
``hcp``, or ``packed_seq_params.cp_group``); nothing here creates one.

CPU (tests, gloo): megatron-core's RoPE moves ``inv_freq`` to ``torch.cuda.current_device()`` on
first use; build with ``use_cpu_initialization=True`` and fusions off, and patch that call (see
``tests/integrations/test_megatron.py``). Tested with megatron-core 0.16.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from seqpar.attention.layout import megatron_cp_layout, pad_cu_seqlens, with_pad_documents
from seqpar.attention.meta import StreamMeta

try:  # megatron-core is a dependency; the import is guarded so the error names it
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
except ImportError as e:  # pragma: no cover - megatron-core is installed with seqpar
    raise ImportError(f"seqpar.integrations.megatron needs megatron-core (pip install 'megatron-core>=0.16.1'): {e}") from e

#: Megatron's cp_comm_type -> seqpar's algorithm.
COMM_TYPES: dict[str, str] = {"p2p": "ring", "a2a": "ulysses", "a2a+p2p": "hybrid"}
_CAUSAL = {AttnMaskType.causal: True, AttnMaskType.padding_causal: True, AttnMaskType.no_mask: False,
           AttnMaskType.padding: False}


class MegatronIntegrationError(ValueError):
    """A Megatron setting seqpar's core attention cannot run; one line naming it."""


def _algorithm(algorithm: str | None, cp_comm_type: str | None) -> str:
    if algorithm is not None:
        if algorithm not in COMM_TYPES.values():
            raise MegatronIntegrationError(f"SeqparCoreAttention(algorithm={algorithm!r}): choose ring, ulysses or hybrid")
        return algorithm
    comm = cp_comm_type or "p2p"
    if comm not in COMM_TYPES:
        raise MegatronIntegrationError(f"cp_comm_type={comm!r} is not supported by seqpar's core attention; "
                                       f"use one of {', '.join(COMM_TYPES)} (p2p = ring, a2a = Ulysses, a2a+p2p = hybrid)")
    return COMM_TYPES[comm]


class SeqparCoreAttention(MegatronModule):
    """megatron-core core attention running seqpar's SP attention over the context-parallel group.

    Constructed by Megatron's ``SelfAttention`` with its keyword arguments; ``algorithm`` (ring |
    ulysses | hybrid) overrides ``cp_comm_type``; ``impl`` is the seqpar kernel (``auto``: Triton on
    CUDA, torch's fused CPU flash on CPU; or ``triton``, ``sdpa_cpu``, ``reference``), resolved for
    the device of each call. No parameters, no process groups of its own.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, *, algorithm: str | None = None,
                 impl: str = "auto") -> None:
        super().__init__(config=config)
        if attn_mask_type not in _CAUSAL:
            raise MegatronIntegrationError(f"attn_mask_type={attn_mask_type} is not supported by seqpar's core attention; "
                                           "use causal, padding_causal, no_mask or padding")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise MegatronIntegrationError(f"attention_dropout={dropout}: seqpar's core attention has no dropout; set it to 0")
        if getattr(config, "window_size", None) is not None:
            raise MegatronIntegrationError("window_size (sliding-window attention) is not supported by seqpar's core "
                                           "attention; set it to None")
        self.layer_number = layer_number
        self.causal = _CAUSAL[attn_mask_type]
        configured = getattr(config, "cp_comm_type", None)  # Megatron passes cp_comm_type only when cp > 1
        self.algorithm = _algorithm(algorithm, cp_comm_type if cp_comm_type is not None else
                                    configured if isinstance(configured, str) else None)
        from seqpar.kernels.dispatch import CHOICES

        if impl not in CHOICES:
            raise MegatronIntegrationError(f"SeqparCoreAttention(impl={impl!r}): choose one of {', '.join(CHOICES)}")
        self.impl = impl
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise MegatronIntegrationError("apply_query_key_layer_scaling is not supported by seqpar's core attention; "
                                           "set it to False")
        self.pg_collection = pg_collection

    def _groups(self, packed_seq_params: PackedSeqParams | None) -> tuple[dist.ProcessGroup | None, list]:
        """(CP group, hierarchical CP groups): the batch's cp_group, else the collection's, else Megatron's
        globals (a ProcessGroupCollection leaves unset groups missing, hence getattr)."""
        from megatron.core import parallel_state

        cp = getattr(packed_seq_params, "cp_group", None)
        if cp is None:
            cp = getattr(self.pg_collection, "cp", None)
        if cp is None:
            cp = parallel_state.get_context_parallel_group(check_initialized=False)
        hcp = list(getattr(self.pg_collection, "hcp", None) or [])
        if not hcp and self.algorithm == "hybrid":
            hcp = list(parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False) or [])
        return cp, hcp

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        """thd: query [t_local, heads, hd], key/value [t_local, kv_groups, hd] (GQA not expanded), global
        cu_seqlens in ``packed_seq_params`` -> [t_local, heads * hd] in the local order.
        sbhd (no packed_seq_params): query [s_local, b, heads, hd] -> [s_local, b, heads * hd], each batch
        row one document of s_local * cp tokens in Megatron's CP layout. Collective over the CP group."""
        if attention_bias is not None:
            raise MegatronIntegrationError("attention_bias is not supported by seqpar's core attention")
        causal = self.causal if attn_mask_type is None else _CAUSAL.get(attn_mask_type, None)
        if causal is None:
            raise MegatronIntegrationError(f"attn_mask_type={attn_mask_type} is not supported by seqpar's core attention")
        cp_group, hcp = self._groups(packed_seq_params)
        cp = dist.get_world_size(cp_group) if cp_group is not None else 1
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            out = self._thd(query, key, value, packed_seq_params, cp_group, hcp, cp, causal)
            return out.reshape(out.shape[0], -1)
        if packed_seq_params is not None and packed_seq_params.qkv_format not in (None, "sbhd"):
            raise MegatronIntegrationError(f"qkv_format={packed_seq_params.qkv_format!r}: seqpar's core attention takes "
                                           "thd or sbhd")
        s, b = query.shape[:2]
        flat = [x.transpose(0, 1).reshape(b * s, *x.shape[2:]) for x in (query, key, value)]
        stream = _stream_cache(_SBHD, (b, s, cp, query.device), lambda: _stream_of(
            np.arange(b + 1, dtype=np.int64) * s * cp, None, cp, query.device))  # one document per batch row
        out = self._run(*flat, stream, cp_group, hcp, cp, causal)
        return out.reshape(b, s, -1).transpose(0, 1).contiguous()

    def _thd(self, q, k, v, params: PackedSeqParams, cp_group, hcp, cp: int, causal: bool) -> torch.Tensor:
        if params.cu_seqlens_q is None:
            raise MegatronIntegrationError("packed_seq_params.cu_seqlens_q is required in the thd format")
        # Every layer gets the same PackedSeqParams: its stream metadata is built once per batch, on
        # the first layer (one host read of cu_seqlens, as Megatron's own thd RoPE makes), and kept on it.
        cache = params.__dict__.setdefault("_seqpar_streams", {})
        stream = _stream_cache(cache, (cp, q.device), lambda: _stream_of(
            params.cu_seqlens_q, params.cu_seqlens_q_padded, cp, q.device, params.cu_seqlens_kv))
        return self._run(q, k, v, stream, cp_group, hcp, cp, causal)

    def _run(self, q, k, v, stream: StreamMeta, cp_group, hcp, cp: int, causal: bool) -> torch.Tensor:
        from seqpar.attention.hybrid import hybrid_attention
        from seqpar.attention.ring import ring_attention
        from seqpar.attention.ulysses import ulysses_attention
        from seqpar.kernels.autograd import block_attention

        local = stream.layout.total // cp
        if q.shape[0] != local:
            raise MegatronIntegrationError(f"this rank holds {q.shape[0]} tokens but cu_seqlens_q_padded (total "
                                           f"{stream.layout.total}) / cp={cp} gives {local}; shard with megatron_thd_shard")
        from seqpar.kernels.dispatch import resolve_impl

        impl = resolve_impl(self.impl, q.device)
        kw = dict(causal=causal, scale=self.softmax_scale, impl=impl)
        if cp == 1:
            meta = stream.block([0])
            return block_attention(q, k, v, meta.doc, meta.pos, meta.doc, meta.pos, causal=causal,
                                   scale=self.softmax_scale, impl=impl, whole=meta.whole)
        ranks = [[i] for i in range(cp)]
        if self.algorithm == "ring":
            return ring_attention(q, k, v, stream.blocks(ranks), cp_group, vis=stream.visibility(ranks, causal), **kw)[0]
        if self.algorithm == "ulysses":
            return ulysses_attention(q, k, v, stream.blocks(ranks), cp_group, gathered=stream.block(list(range(cp))), **kw)
        if len(hcp) != 2 or dist.get_world_size(hcp[0]) * dist.get_world_size(hcp[1]) != cp:
            raise MegatronIntegrationError("cp_comm_type=a2a+p2p needs hierarchical_context_parallel_sizes=[ulysses, ring] "
                                           f"multiplying to context_parallel_size={cp} (Megatron's hcp groups)")
        return hybrid_attention(q, k, v, stream, hcp[0], hcp[1], **kw)


_SBHD: dict = {}  # sbhd stream metadata by (batch, local length, cp, device): a few shapes per run


def _stream_cache(cache: dict, key: tuple, build) -> StreamMeta:
    stream = cache.get(key)
    if stream is None:
        if len(cache) > 16:
            cache.clear()
        stream = cache[key] = build()
    return stream


def _host(cu: torch.Tensor | np.ndarray) -> np.ndarray:
    return (cu.cpu().numpy() if isinstance(cu, torch.Tensor) else np.asarray(cu)).astype(np.int64)


def _stream_of(cu_q, cu_q_padded, cp: int, device: torch.device, cu_kv=None) -> StreamMeta:
    """Block metadata of a batch in Megatron's CP layout: real documents, each followed by its pad
    tokens as a document of their own (host arrays, built once per batch)."""
    real = _host(cu_q)
    if cu_kv is not None and cu_kv is not cu_q and not np.array_equal(_host(cu_kv), real):
        raise MegatronIntegrationError("cu_seqlens_kv differs from cu_seqlens_q: seqpar's core attention is self-attention")
    padded = _host(cu_q_padded) if cu_q_padded is not None else real
    return StreamMeta(with_pad_documents(real, padded), megatron_cp_layout(padded, cp), device)


@dataclass
class MegatronBatch:
    """One CP rank's share of a packed batch, as megatron-core's GPTModel takes it (thd format).

    input_ids, labels, position_ids: int64 [1, t_local]; loss_mask: float32 [1, t_local] (0 on pad
    tokens); packed_seq_params: global cu_seqlens (real and padded, int32 [docs + 1]) and the
    padded max length; token_index: int64 [t_local], each local token's index in the unpadded batch
    (-1 on pad tokens), to put per-token outputs back together.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    packed_seq_params: PackedSeqParams
    token_index: torch.Tensor


def megatron_thd_shard(tokens: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | np.ndarray, cp: int,
                       cp_rank: int, cp_group: dist.ProcessGroup | None = None, pad_id: int = 0) -> MegatronBatch:
    """Pad every document of a packed batch to a multiple of 2 x cp and take rank ``cp_rank``'s chunks
    (r and 2cp-1-r of each document), the layout Megatron's thd RoPE and core attention expect.

    tokens, labels: int [T] on any device (labels already shifted; pad positions get label
    ``pad_id`` and loss_mask 0); cu_seqlens: int [docs + 1] of the real documents. Pure indexing,
    no communication; every rank calls it with the same global batch.
    """
    real = (cu_seqlens.cpu().numpy() if isinstance(cu_seqlens, torch.Tensor) else np.asarray(cu_seqlens)).astype(np.int64)
    if tokens.shape[0] != int(real[-1]) or labels.shape != tokens.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} must both have cu_seqlens[-1]="
                         f"{int(real[-1])} entries")
    padded = pad_cu_seqlens(real, 2 * cp)
    total = int(padded[-1])
    # padded position of every real token, and its position inside its document
    doc_of = np.repeat(np.arange(real.size - 1), np.diff(real))
    dest = np.arange(int(real[-1])) - real[doc_of] + padded[doc_of]
    pos_padded = np.arange(total) - np.repeat(padded[:-1], np.diff(padded))
    dev = tokens.device
    full_tok = torch.full((total,), pad_id, dtype=torch.long, device=dev)
    full_lab = torch.full((total,), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros(total, dtype=torch.float32, device=dev)
    idx = torch.as_tensor(dest, device=dev)
    full_tok[idx], full_lab[idx], mask[idx] = tokens.long(), labels.long(), 1.0
    where = torch.full((total,), -1, dtype=torch.long, device=dev)
    where[idx] = torch.arange(int(real[-1]), device=dev)
    mine = torch.as_tensor(megatron_cp_layout(padded, cp).indices[cp_rank], device=dev)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=torch.as_tensor(real, dtype=torch.int32, device=dev),
        cu_seqlens_kv=torch.as_tensor(real, dtype=torch.int32, device=dev),
        cu_seqlens_q_padded=torch.as_tensor(padded, dtype=torch.int32, device=dev),
        cu_seqlens_kv_padded=torch.as_tensor(padded, dtype=torch.int32, device=dev),
        max_seqlen_q=int(np.diff(padded).max(initial=0)),
        max_seqlen_kv=int(np.diff(padded).max(initial=0)),
        cp_group=cp_group,
    )
    return MegatronBatch(full_tok[mine][None], full_lab[mine][None],
                         torch.as_tensor(pos_padded, device=dev)[mine][None], mask[mine][None], params, where[mine])
