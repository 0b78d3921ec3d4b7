"""A data-parallel run gives the same losses as one process on the same global batch."""

import math

import pytest

from seqpar.config import load_config


def _train(overrides):
    from seqpar.train.trainer import train

    return [(r["loss"], r["grad_norm"], r["tokens"], r["targets"]) for r in train(load_config(None, overrides))]


def _overrides(store, tmp_path, name, mode="pack"):
    return [
        f"data.path={store}",
        f"data.mode={mode}",
        "data.seq_len=256",
        "data.tokens_per_step=2048",  # 8 streams: 8 micro-batches on 1 rank, 4 on each of 2
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "train.steps=3",
        "train.warmup_steps=1",
        "logging.progress=false",
        f"run.name={name}",
        f"run.output_dir={tmp_path / name}",
    ]


@pytest.mark.parametrize(
    "mode,world,fsdp",
    [("pack", 2, False), ("pack", 2, True), ("pack", 4, True), ("concat_chunk", 2, True)],
)
def test_data_parallel_matches_single_process(dist_pool, small_store, tmp_path, mode, world, fsdp):
    # The reference is one process without FSDP: both sharding and replication must reproduce it.
    single = dist_pool(1).run(_train, _overrides(small_store, tmp_path, "one", mode) + ["parallel.fsdp=false"])[0]
    multi = dist_pool(world).run(_train, _overrides(small_store, tmp_path, "multi", mode) + [f"parallel.fsdp={fsdp}"])
    assert all(m == multi[0] for m in multi)  # every rank reports the same global values
    assert [r[2:] for r in multi[0]] == [r[2:] for r in single]  # same tokens and targets
    for (loss_m, gn_m, *_), (loss_1, gn_1, *_) in zip(multi[0], single):
        assert loss_m == pytest.approx(loss_1, rel=1e-5)
        assert gn_m == pytest.approx(gn_1, rel=1e-4)
    assert single[-1][0] < single[0][0]  # it learns
    assert (tmp_path / "multi" / "metrics.jsonl").read_text().count("\n") == 3
    assert (tmp_path / "multi" / "config.yaml").exists()


def test_batch_that_does_not_split_over_dp(dist_pool, small_store, tmp_path):
    overrides = _overrides(small_store, tmp_path, "odd") + ["data.tokens_per_step=768"]  # 3 streams over dp=2
    with pytest.raises(AssertionError, match="make data.tokens_per_step a multiple of 512"):
        dist_pool(2).run(_train, overrides)


def _megatron_store(prefix):
    """A store built the way Megatron's preprocess_data.py does with --split-sentences (int32, EOD)."""
    import warnings

    import numpy as np
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    eod = 999
    for _ in range(60):
        sentences = [rng.integers(0, 900, int(rng.integers(5, 80))) for _ in range(int(rng.integers(1, 5)))]
        sentences[-1] = np.append(sentences[-1], eod)
        builder.add_document(torch.from_numpy(np.concatenate(sentences)), [len(s) for s in sentences])
    builder.finalize(prefix + ".idx")
    return prefix


def test_megatron_built_store_trains(dist_pool, tmp_path):
    prefix = _megatron_store(str(tmp_path / "megatron_text_document"))
    base = _overrides(prefix, tmp_path, "meg") + ["data.seq_len=128", "data.tokens_per_step=512"]
    with pytest.raises(AssertionError, match="token id 999 does not fit model.vocab_size=320; set model.vocab_size to at least 1000"):
        dist_pool(1).run(_train, base)
    records = dist_pool(1).run(_train, base + ["model.vocab_size=1024"])[0]
    assert len(records) == 3 and all(400 < r[2] <= 512 for r in records)  # best-fit packing fills ~99%
    assert all(math.isfinite(r[0]) for r in records)


def _records(overrides):
    from seqpar.train.trainer import train

    return train(load_config(None, overrides))


def test_mfu_from_known_profile_and_none_on_cpu(dist_pool, small_store, tmp_path):
    base = _overrides(small_store, tmp_path, "mfu") + ["train.steps=1"]
    known = dist_pool(1).run(_records, base + ["cluster.profile=H100-SXM", f"run.output_dir={tmp_path}/h100"])[0][0]
    # fp32 on CPU compares against the profile's fp32 peak: 66.9 TFLOP/s for an H100-SXM.
    assert known["mfu"] == pytest.approx(known["tflops_per_s"] / 66.9, rel=1e-9)
    cpu = dist_pool(1).run(_records, base + [f"run.output_dir={tmp_path}/cpu"])[0][0]
    assert cpu["mfu"] is None and cpu["tflops_per_s"] > 0


def _decompose(store, out):
    from seqpar.data.decompose import decompose_store

    decompose_store(store, out, min_log2=5, max_log2=8, progress=False)
    return out


def test_decomposed_data_trains_with_constant_targets_and_dp(dist_pool, small_store, tmp_path):
    out = _decompose(small_store, str(tmp_path / "dd"))
    base = [
        f"data.path={out}",
        "data.mode=decompose",
        "data.seq_len=256",  # 2^max_log2
        "data.tokens_per_step=1024",  # 4 streams of 2^8 targets each
        "data.curriculum=grow_p2",
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "train.steps=4",
        "logging.progress=false",
    ]
    one = dist_pool(1).run(_train, base + [f"run.output_dir={tmp_path}/one", "parallel.fsdp=false"])[0]
    two = dist_pool(2).run(_train, base + [f"run.output_dir={tmp_path}/two", "parallel.sp=2", "parallel.ring=2"])
    assert all(r[3] == 1024 for r in one)  # constant targets per step whatever the bucket
    # Each piece of 2^k targets has 2^k + 1 tokens, so a step holds more tokens than targets.
    assert all(r[2] > r[3] for r in one)
    for r2, r1 in zip(two[0], one):
        assert r2[2:] == r1[2:] and r2[0] == pytest.approx(r1[0], rel=1e-4)


def test_decompose_mode_needs_a_matching_window(dist_pool, small_store, tmp_path):
    out = _decompose(small_store, str(tmp_path / "dd"))
    overrides = [f"data.path={out}", "data.mode=decompose", "data.seq_len=512", "data.tokens_per_step=1024",
                 f"run.output_dir={tmp_path}/bad", "logging.progress=false"]
    with pytest.raises(AssertionError, match="data.seq_len=512 must equal 2\\^max_log2 = 256"):
        dist_pool(1).run(_train, overrides)
