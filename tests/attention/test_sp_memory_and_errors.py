"""Per-rank activation memory falls as 1/P; bad layouts, heads and groups give clear errors."""

import pytest
import torch

from tests.attention.memory_cases import saved_activation_bytes

SEQLENS = [2048, 1024, 1024]  # 4096 tokens, every document divisible by 2P for P <= 8


@pytest.mark.parametrize("algorithm", ["ring", "ulysses", "hybrid"])
def test_saved_activations_fall_as_one_over_p(dist_pool, algorithm):
    base = dist_pool(1).run(saved_activation_bytes, "ring", 1, 1, SEQLENS)[0]
    worlds = [4, 8] if algorithm == "hybrid" else [2, 4, 8]
    for p in worlds:
        u, r = {"ring": (1, p), "ulysses": (p, 1), "hybrid": (2, p // 2)}[algorithm]
        per_rank = dist_pool(p).run(saved_activation_bytes, algorithm, u, r, SEQLENS)
        # Within 10% of base / P on the busiest rank: what stays is O(T/P) per rank.
        assert max(per_rank) <= 1.10 * base / p, (algorithm, p, per_rank, base)
        assert min(per_rank) >= 0.90 * base / p, (algorithm, p, per_rank, base)


def test_ulysses_head_errors():
    from seqpar.attention.ulysses import check_heads

    with pytest.raises(ValueError, match="Ulysses degree 4 must divide the number of attention heads 6"):
        check_heads(6, 6, 4)
    with pytest.raises(ValueError, match="Ulysses degree 4 and kv_heads 3: one must divide the other"):
        check_heads(12, 3, 4)
    check_heads(8, 2, 4)  # replication
    check_heads(8, 8, 4)  # split


def _wrong_group_and_layout():
    import torch.distributed as dist

    from seqpar.attention.layout import build_layout
    from seqpar.attention.ring import ring_attn_varlen_func

    cu = torch.tensor([0, 40], dtype=torch.int32)
    q = torch.randn(20, 2, 8)
    errors = []
    for layout in (build_layout(cu.numpy(), "zigzag", ring=4), "diagonal"):
        try:
            ring_attn_varlen_func(q, q, q, cu, group=dist.group.WORLD, layout=layout)
        except ValueError as e:
            errors.append(str(e))
    lay = build_layout(cu.numpy(), "zigzag", ring=2)
    try:  # this rank's q does not match what the layout gives it
        ring_attn_varlen_func(q[:7], q[:7], q[:7], cu, group=dist.group.WORLD, layout=lay)
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_wrong_layout_or_group_is_a_clear_error(dist_pool):
    errors = dist_pool(2).run(_wrong_group_and_layout)[0]
    assert "layout is for 4 ranks but the group has 2" in errors[0]
    assert "parallel.layout='diagonal' is not allowed; choose one of 'contiguous', 'zigzag'" in errors[1]
    assert "this rank's layout holds 20 tokens but q has 7" in errors[2]


def test_model_heads_not_divisible_by_ulysses_is_a_config_error():
    from seqpar.config import ConfigError, ModelConfig
    from seqpar.train.dry_run import check_sp_heads

    with pytest.raises(ConfigError, match="6"):
        check_sp_heads(ModelConfig(dim=48, n_heads=6, n_kv_heads=6), 4)
