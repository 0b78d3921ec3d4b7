"""Training with sequence parallelism gives the single-device losses and parameters."""

import pytest
import torch

from seqpar.config import load_config
from tests.support.checkpoints import final_params


def _train(overrides):
    from seqpar.train.trainer import train

    return [(r["loss"], r["tokens"], r["targets"]) for r in train(load_config(None, overrides))]


def _overrides(store, run_dir):
    return [
        f"data.path={store}",
        "data.seq_len=256",
        "data.tokens_per_step=1024",
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",  # GQA with kv_heads < P: Ulysses replicates KV heads
        "train.steps=5",
        "train.warmup_steps=1",
        "logging.progress=false",
        f"run.output_dir={run_dir}",
    ]


LAYOUTS = {
    "sp4-ring": (4, ["parallel.sp=4", "parallel.ring=4", "parallel.algorithm=ring"]),
    "sp4-ring-contiguous": (4, ["parallel.sp=4", "parallel.ring=4", "parallel.layout=contiguous"]),
    "sp4-ulysses": (4, ["parallel.sp=4", "parallel.ulysses=4", "parallel.algorithm=ulysses"]),
    "sp4-hybrid": (4, ["parallel.sp=4", "parallel.ulysses=2", "parallel.ring=2", "parallel.algorithm=hybrid"]),
    "dp2-sp2-ring-replicated": (4, ["parallel.sp=2", "parallel.ring=2", "parallel.fsdp=false"]),
}


@pytest.fixture(scope="module")
def single(dist_pool, small_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sp1")
    return dist_pool(1).run(_train, _overrides(small_store, run_dir))[0], final_params(run_dir)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sp_training_matches_single_device(dist_pool, small_store, tmp_path, single, name):
    world, extra = LAYOUTS[name]
    records, params = single
    got = dist_pool(world).run(_train, _overrides(small_store, tmp_path) + extra)
    assert all(g == got[0] for g in got)  # every rank reports the same global values
    # Tokens and targets are counted once per token, whatever the sp degree.
    assert [r[1:] for r in got[0]] == [r[1:] for r in records]
    for (loss, *_), (ref, *_) in zip(got[0], records):
        assert loss == pytest.approx(ref, rel=1e-4)
    final = final_params(tmp_path)
    assert final.keys() == params.keys()
    for key in params:
        torch.testing.assert_close(final[key], params[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")
