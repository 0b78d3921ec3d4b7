"""Data off the critical path: prefetch hides CPU-bound data work and changes no loss; an empty
pass takes part in FSDP and gives every parameter a gradient.

No timing assertion depends on thread scheduling: without prefetch the wait is at least the
injected work (a lower bound of wall time); with prefetch the test's trainer waits inside each
step until the next step's data job is done (a step longer than the data work), so the next
wait is for a finished job, and the bound checked is a third of the injected work.
"""

import os

import pytest
import torch

from seqpar.config import load_config

SLOW_S = 1.5


def _train(overrides, slow_s, wait_inside_step):
    from seqpar.train.trainer import Trainer

    class WaitingTrainer(Trainer):
        def forward_backward_step(self, micro_batches, poison=False):
            res = super().forward_backward_step(micro_batches, poison)
            if wait_inside_step:
                self.feed.wait_pending()
            return res

    os.environ["SEQPAR_FAULT_SLOW_DATA_S"] = str(slow_s)
    try:
        records = WaitingTrainer(load_config(None, overrides)).train()
    finally:
        del os.environ["SEQPAR_FAULT_SLOW_DATA_S"]
    return [(r["loss"], r["data_wait_s"]) for r in records]


def _overrides(store, run_dir, extra):
    return [f"data.path={store}", "data.seq_len=128", "data.tokens_per_step=512", "model.dim=32", "model.n_layers=2",
            "model.n_heads=4", "model.n_kv_heads=2", "train.steps=3", "train.warmup_steps=1", "logging.progress=false",
            "checkpoint.save_final=false", f"run.output_dir={run_dir}", *extra]


MODES = {
    "pack-dp2": (2, ["parallel.sp=1", "parallel.ring=1"]),
    # time_limit_s=0: the planner's first level build alone, no clock, so both runs get the same plans
    # however busy the machine (a clock-limited planner could plan them differently: other sums)
    "adaptive": (2, ["parallel.algorithm=adaptive", "parallel.dp=1", "data.mode=varlen", "scatter.capacity_tokens=1024",
                     "scatter.time_limit_s=0"]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_prefetch_hides_cpu_bound_data_work(dist_pool, small_store, tmp_path, mode):
    world, extra = MODES[mode]
    pool = dist_pool(world)
    off = pool.run(_train, _overrides(small_store, tmp_path / "off", extra + ["data.prefetch=false"]), SLOW_S, False)[0]
    on = pool.run(_train, _overrides(small_store, tmp_path / "on", extra), SLOW_S, True)[0]
    assert all(wait >= SLOW_S for _, wait in off)  # the main thread did the work itself
    assert all(wait < SLOW_S / 3 for _, wait in on[1:]), on
    assert [loss for loss, _ in on] == pytest.approx([loss for loss, _ in off], rel=1e-6)


def _empty_pass_case(vocab):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seqpar.attention import build_attention
    from seqpar.config import ModelConfig
    from seqpar.model.llama import token_loss_sum
    from seqpar.train.batch import empty_microbatch, make_microbatch
    from seqpar.train.build import build_model

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab)
    cpu = torch.device("cpu")
    attn = build_attention("auto", cpu)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build_model(cfg, attn, cpu, seed=5, fsdp_mesh=mesh)
    tokens = torch.arange(40) % vocab
    real = make_microbatch(tokens.numpy(), [0, 25, 40], cpu)
    mb = empty_microbatch(cpu) if dist.get_rank() == 0 else real
    token_loss_sum(model(mb.tokens, mb.ctx), mb.labels).backward()
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    missing = [n for n, _ in model.named_parameters() if n not in got]
    ref = build_model(cfg, attn, cpu, seed=5)  # replicated, same name-seeded init
    token_loss_sum(ref(real.tokens, real.ctx), real.labels).backward()
    errs = {n: float((got[n] - p.grad).abs().max()) for n, p in ref.named_parameters() if n in got}
    return missing, max(errs.values())


def test_empty_pass_gives_every_parameter_a_gradient_under_fsdp(dist_pool):
    """Rank 0 has no tokens, rank 1 has a micro-batch: FSDP's summed gradient is rank 1's alone."""
    for missing, err in dist_pool(2).run(_empty_pass_case, 64):
        assert missing == []
        assert err < 1e-5
