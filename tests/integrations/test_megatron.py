"""seqpar's attention as megatron-core's core attention: GPTModel at cp = 2 and 4 (ring, Ulysses,
hybrid; GQA and MQA) gives the logits and every gradient of cp = 1 on one packed batch of awkward
document lengths; at cp = 1 it matches Megatron's own DotProductAttention; Megatron's CP layout
is the one its thd RoPE assumes; unsupported settings are one line."""

import numpy as np
import pytest
import torch

from seqpar.attention.layout import megatron_cp_layout, pad_cu_seqlens, with_pad_documents
from tests.integrations import megatron_cases

LENGTHS = [7, 1, 23, 2, 31, 5]  # a 1-token document, lengths prime to 2 x cp: every document padded


@pytest.mark.parametrize("algorithm,kv", [("ring", 2), ("ulysses", 2), ("ulysses", 1)])
def test_cp2_matches_cp1(dist_pool, algorithm, kv):
    results = dist_pool(2).run(megatron_cases.cp_parity, algorithm, LENGTHS, 4, kv, timeout_s=600)
    for r in results:
        assert r["n_grads"] >= 15  # embeddings, 2 x (norms, qkv, proj, fc1, fc2), final norm, output layer
        assert r["logits"] < 1e-5 and r["grads"] < 1e-5, r


@pytest.mark.parametrize("algorithm", ["ring", "ulysses", "hybrid"])
def test_cp4_matches_cp1(dist_pool, algorithm):
    results = dist_pool(4).run(megatron_cases.cp_parity, algorithm, LENGTHS, timeout_s=600)
    for r in results:
        assert r["logits"] < 1e-5 and r["grads"] < 1e-5, r


def test_cp1_matches_megatrons_own_attention(dist_pool):
    assert max(dist_pool(2).run(megatron_cases.matches_megatron_attention)) < 1e-5


def test_megatron_layout_is_the_one_its_rope_assumes():
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    real = np.array([0, 7, 8, 31, 33, 64])
    for cp in (1, 2, 3, 4):
        padded = pad_cu_seqlens(real, 2 * cp)
        assert np.all(np.diff(padded) % (2 * cp) == 0) and np.all(np.diff(padded) - np.diff(real) < 2 * cp)
        layout = megatron_cp_layout(padded, cp)
        assert sorted(np.concatenate(layout.indices).tolist()) == list(range(int(padded[-1])))
        positions = torch.arange(int(np.diff(padded).max()))
        for rank in range(cp):
            # Megatron's RoPE: each document's local tokens get these positions on this rank
            expected = torch.cat([_get_thd_freqs_on_this_cp_rank(rank, cp, torch.empty(int(n) // cp), positions)
                                  for n in np.diff(padded)])
            ix = layout.indices[rank]
            doc = np.searchsorted(padded, ix, side="right") - 1
            assert np.array_equal(ix - padded[doc], expected.numpy()), (cp, rank)
    attn = with_pad_documents(real, pad_cu_seqlens(real, 4))
    assert attn.tolist() == [0, 7, 8, 9, 12, 35, 36, 38, 40, 71, 72]  # every pad run is a document of its own
    with pytest.raises(ValueError, match="not a multiple of 2 x cp = 4"):
        megatron_cp_layout(real, 2)


def test_shard_puts_every_token_once():
    from seqpar.integrations.megatron import megatron_thd_shard

    cu = np.array([0, 7, 8, 31])
    tok = torch.arange(31) + 100
    seen = []
    for rank in range(2):
        b = megatron_thd_shard(tok, tok + 1, cu, 2, rank)
        real = b.token_index >= 0
        assert torch.equal(b.input_ids[0][real], tok[b.token_index[real]])
        assert torch.equal(b.loss_mask[0] > 0, real)
        assert b.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 8, 12, 36]
        assert b.packed_seq_params.max_seqlen_q == 24
        seen += b.token_index[real].tolist()
    assert sorted(seen) == list(range(31))


def test_unsupported_settings_are_one_line():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from seqpar.integrations.megatron import MegatronIntegrationError, SeqparCoreAttention

    def build(**kw):
        cfg = dict(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
        extra = {k: kw.pop(k) for k in list(kw) if k in ("attention_dropout", "cp_comm_type")}
        config = TransformerConfig(**cfg, **{"attention_dropout": 0.0, **extra})
        return SeqparCoreAttention(config, 1, kw.pop("mask", AttnMaskType.causal), "self", **kw)

    assert build().algorithm == "ring" and build(cp_comm_type="a2a").algorithm == "ulysses"
    assert build(cp_comm_type="a2a+p2p").algorithm == "hybrid" and build(algorithm="ulysses").algorithm == "ulysses"
    for kw, match in [({"cp_comm_type": "allgather"}, "cp_comm_type='allgather' is not supported"),
                      ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
                      ({"algorithm": "tree"}, "algorithm='tree'"),
                      ({"mask": AttnMaskType.arbitrary}, "attn_mask_type=")]:
        with pytest.raises(MegatronIntegrationError, match=match) as e:
            build(**kw)
        assert "\n" not in str(e.value)
