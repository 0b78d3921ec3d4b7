"""Memory policies (none / full / selective / offload): same loss and gradients, attention forward
run once per layer and micro-batch under selective and offload (twice under full), and no
attention collective during selective's recomputation or offload's reloads."""

import pytest
import torch

from seqpar.config import ConfigError, config_from_dict
from seqpar.memory.checkpoint import apply_memory_policy, memory_policy_of
from tests.memory.policy_cases import CFG, POLICIES, run_policy, sp_policy_matrix

LAYERS, MICRO = CFG["n_layers"], 2


def _same(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert abs(a["loss"] - b["loss"]) <= rtol * abs(b["loss"]), (a["loss"], b["loss"])
    assert sorted(a["grads"]) == sorted(b["grads"])
    for name, g in a["grads"].items():
        torch.testing.assert_close(g, b["grads"][name], rtol=rtol, atol=atol, msg=name)


def test_policies_single_process_same_loss_and_gradients_and_attention_counts():
    runs = {p: run_policy(p) for p in POLICIES}
    for p in POLICIES[1:]:
        # The same ops, recomputed or moved: fp32-tight (memo splits token-local matmuls into two row
        # blocks, so weight gradients are summed in another order).
        _same(runs[p], runs["none"], rtol=1e-6, atol=1e-9 if "@" not in p else 1e-7)
    once = LAYERS * MICRO
    assert {p: r["attention_calls"] for p, r in runs.items()} == {
        p: 2 * once if p == "full" else once for p in POLICIES}
    for p in ("offload", "memo@0", "memo@0.5", "memo@1"):
        off = runs[p]
        assert off["offloaded_bytes"] > 0 and off["host_bytes_after"] == 0  # moved, and freed after each micro-batch
        assert off["late_reloads"] == 0  # every reload was prefetched when the block above started its backward
    # alpha keeps more tokens' tensors: more bytes move; alpha = 1 moves what offload moves.
    moved = [runs[p]["offloaded_bytes"] for p in ("memo@0", "memo@0.5", "memo@1")]
    assert moved[0] < moved[1] < moved[2] == runs["offload"]["offloaded_bytes"]
    assert runs["none"]["loss"] > 0 and all(g.abs().sum() > 0 for g in runs["none"]["grads"].values())


@pytest.mark.parametrize("world,shapes", [
    (2, [("ring", 1, 2), ("ulysses", 2, 1)]),
    (4, [("ring", 1, 4), ("ulysses", 4, 1), ("hybrid", 2, 2)]),
])
def test_policies_under_sp_match_single_device_and_never_rerun_attention_collectives(dist_pool, world, shapes):
    for out in dist_pool(world).run(sp_policy_matrix, shapes):
        single = out["single"]
        for algorithm, _, _ in shapes:
            none = out[(algorithm, "none")]
            assert none["fwd_collectives"] > 0 and none["bwd_collectives"] > 0  # the counters see the SP traffic
            for policy in POLICIES:
                r = out[(algorithm, policy)]
                _same(r, single, rtol=1e-5, atol=1e-7)  # SP vs one device: fp32, sums in another order
                # memo splits the token-local matmuls in two row blocks: weight gradients sum in
                # another order, like SP's.
                _same(r, none, rtol=1e-6, atol=1e-9) if "@" not in policy else _same(r, none, rtol=1e-5, atol=1e-7)
                assert r["fwd_collectives"] == none["fwd_collectives"], (algorithm, policy)
            sel, full = out[(algorithm, "selective")], out[(algorithm, "full")]
            # Selective's backward launches exactly the attention backward's collectives: nothing is
            # recomputed that communicates. Full's backward reruns every forward collective.
            assert sel["bwd_collectives"] == none["bwd_collectives"], algorithm
            assert full["bwd_collectives"] == none["bwd_collectives"] + none["fwd_collectives"], algorithm
            assert sel["attention_calls"] == none["attention_calls"] == LAYERS * MICRO
            for p in ("offload", "memo@0", "memo@0.5", "memo@1"):
                # Reloads and memo's recomputation launch no attention collective; attention ran once.
                off = out[(algorithm, p)]
                assert off["bwd_collectives"] == none["bwd_collectives"] and off["attention_calls"] == LAYERS * MICRO, p
                assert off["offloaded_bytes"] > 0 and off["late_reloads"] == 0, p
            assert full["attention_calls"] == 2 * LAYERS * MICRO


def test_policy_application_and_config_alias():
    from seqpar.attention import build_attention
    from seqpar.config import ModelConfig
    from seqpar.model.llama import Transformer

    model = Transformer(ModelConfig(**CFG), build_attention("reference", torch.device("cpu")))
    apply_memory_policy(model.layers, "selective")
    apply_memory_policy(model.layers, "selective")  # idempotent
    assert [memory_policy_of(b) for b in model.layers] == ["selective"] * LAYERS
    with pytest.raises(ValueError, match="already has memory policy 'selective'"):
        apply_memory_policy(model.layers, "full")
    with pytest.raises(ValueError, match="memory.policy='memo2'"):
        apply_memory_policy(model.layers, "memo2")
    with pytest.raises(ValueError, match="already has memory policy 'selective'; cannot apply 'offload'"):
        apply_memory_policy(model.layers, "offload")
    # model.activation_checkpointing: true is the older spelling of memory.policy: full.
    assert config_from_dict({"model": {"activation_checkpointing": True}}).memory.policy == "full"
    assert config_from_dict({"memory": {"policy": "selective"}}).memory.policy == "selective"
    with pytest.raises(ConfigError, match="model.activation_checkpointing=true means memory.policy=full"):
        config_from_dict({"model": {"activation_checkpointing": True}, "memory": {"policy": "selective"}})
    with pytest.raises(ConfigError, match="memory.policy"):
        config_from_dict({"memory": {"policy": "all"}})
