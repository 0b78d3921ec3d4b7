"""The dry run validates a layout for N ranks and reports it, without processes or data."""

import os
import subprocess
import sys

import pytest

from seqpar.config import ConfigError, load_config
from seqpar.parallel.dims import ParallelDimsError
from seqpar.train.dry_run import check_sp_heads, dry_run_report, plan_dry_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = os.path.join(REPO, "configs", "llama-1b-128k.yaml")
TINY = os.path.join(REPO, "configs", "tiny-cpu.yaml")


def test_llama_1b_128k_on_8_ranks():
    cfg = load_config(LLAMA)
    plan = plan_dry_run(cfg, 8)
    assert (plan.dims.dp, plan.dims.sp, plan.dims.ulysses, plan.dims.ring) == (1, 8, 8, 1)
    assert plan.tokens_per_rank == 16384 and plan.micro_batches_per_rank == 8
    assert 1.2e9 < plan.num_params < 1.3e9  # Llama 3.2 1B: 1.236B with tied embeddings
    report = dry_run_report(cfg, 8)
    assert "dp 1 x sp 8 (ulysses 8 x ring 1)" in report
    assert "16,384 tokens per rank" in report
    assert "8 micro-batches per rank per step" in report
    assert "FSDP-sharded over dp x sp = 8" in report
    for rank in range(8):  # small world: one line per rank
        assert any(line.split()[:2] == [str(rank), "0"] for line in report.splitlines())


def test_fsdp_shards_model_state_by_world():
    sharded = plan_dry_run(load_config(LLAMA), 8)
    replicated = plan_dry_run(load_config(LLAMA, ["parallel.fsdp=false"]), 8)
    assert replicated.state_bytes == pytest.approx(8 * sharded.state_bytes)
    # fp32 params + fp32 grads + 2 x fp32 AdamW = 16 bytes per parameter when replicated.
    assert replicated.state_bytes == pytest.approx(16 * replicated.num_params)
    assert "replicated (parallel.fsdp=false)" in dry_run_report(load_config(LLAMA, ["parallel.fsdp=false"]), 8)


def test_tiny_cpu_on_2_ranks():
    cfg = load_config(TINY)
    plan = plan_dry_run(cfg, 2)
    assert (plan.dims.dp, plan.dims.sp) == (1, 2)
    assert plan.micro_batches_per_rank == 8 and plan.tokens_per_rank == 256
    assert plan.vocab_size == 320  # byte tokenizer (257) rounded up to 64
    assert cfg.model.vocab_size == 0, "the dry run must not modify the config"
    assert "dp 1 x sp 2" in dry_run_report(cfg, 2)


def test_flops_and_large_world_summary():
    cfg = load_config(LLAMA, ["parallel.sp=16", "parallel.ring=2", "cluster.profile=H100-SXM"])
    plan = plan_dry_run(cfg, 64)
    assert plan.flops_per_step == pytest.approx(plan.flops_per_token * cfg.data.tokens_per_step)
    report = dry_run_report(cfg, 64)
    assert "ring groups:    2 ranks strided by 8" in report
    assert "rank 63: dp 3, sp 15 (ring 1, ulysses 7)" in report
    assert len(report.splitlines()) < 30  # no per-rank table for big worlds
    assert "step time at 100% MFU" in report


def test_uneven_shards_are_reported():
    report = dry_run_report(load_config(TINY, ["parallel.sp=3", "parallel.ring=3"]), 6)
    assert "not divisible by sp 3" in report and "uneven by design" in report


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_world_size_mismatch():
    with pytest.raises(ParallelDimsError) as e:
        dry_run_report(load_config(LLAMA), 12)
    assert "world size 12" in _one_line(e) and "parallel.sp=8" in str(e.value)
    with pytest.raises(ParallelDimsError) as e:
        dry_run_report(load_config(TINY, ["parallel.dp=2"]), 3)
    assert "must equal the world size 3" in _one_line(e)


def test_batch_that_does_not_split_over_dp():
    with pytest.raises(ConfigError) as e:
        dry_run_report(load_config(LLAMA), 48)  # 8 streams over dp 6
    msg = _one_line(e)
    assert "dp=6" in msg and "multiple of 786432" in msg


def test_heads_not_divisible_by_ulysses():
    with pytest.raises(ConfigError) as e:
        dry_run_report(load_config(TINY, ["parallel.sp=8", "parallel.ulysses=8", "parallel.ring=1", "parallel.algorithm=ulysses"]), 8)
    msg = _one_line(e)
    assert "model.n_heads=4" in msg and "parallel.ulysses=8" in msg


def test_gqa_rule():
    # 24 query heads split over 8, but 6 KV heads neither split over 8 nor divide 8.
    cfg = load_config(LLAMA, ["model.n_heads=24", "model.n_kv_heads=6", "model.dim=1536"])
    with pytest.raises(ConfigError) as e:
        dry_run_report(cfg, 8)
    msg = _one_line(e)
    assert "model.n_kv_heads=6" in msg and "parallel.ulysses=8" in msg
    # Replication (ulysses % n_kv_heads == 0) and splitting are both fine.
    check_sp_heads(load_config(LLAMA, ["model.n_kv_heads=2"]).model, 8)
    check_sp_heads(load_config(LLAMA).model, 4)


def test_cli_dry_run_prints_the_mesh():
    proc = subprocess.run(
        [sys.executable, "-m", "seqpar.launcher", "train", "configs/llama-1b-128k.yaml", "--dry-run", "--world-size", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "world 8 = dp 1 x sp 8 (ulysses 8 x ring 1)" in proc.stdout
    assert "torch.distributed.run" not in proc.stdout  # nothing launched


def test_cli_dry_run_error_is_one_line(capsys):
    from seqpar.launcher.cli import main

    assert main(["train", LLAMA, "--dry-run", "--world-size", "12"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("seqpar: error: world size 12")


def test_llama_7b_1m_dry_run_has_a_per_policy_memory_table():
    """configs/llama-7b-1m.yaml on 8 x H100-SXM: each policy's estimated peak, whether it fits 80 GiB,
    and the longest shard that does. At 131,072 tokens per rank only memo fits, with alpha from
    MEMO's LP under the config's 224 GiB of host memory per rank (MEMO: 7B, 1M tokens, 8 x A800)."""
    cfg = load_config(os.path.join(REPO, "configs", "llama-7b-1m.yaml"), ["cluster.profile=H100-SXM"])
    plan = plan_dry_run(cfg, 8)
    assert plan.memory_tokens == 131072 and plan.memory_layout.algorithm == "ulysses"
    assert set(plan.estimates) == {"none", "full", "selective", "offload", "memo"}
    peaks = {p: e.peak_bytes for p, e in plan.estimates.items()}
    assert peaks["memo"] < peaks["offload"] < peaks["full"] < peaks["selective"] < peaks["none"]
    off = plan.estimates["offload"]  # 30 of 32 blocks in host memory, the 2 kept ones on the device
    assert off.host == pytest.approx(plan.estimates["none"].activations * 30 / 32)
    assert off.activations == pytest.approx(plan.estimates["none"].activations * 2 / 32)
    assert all(peak > plan.usable_bytes for p, peak in peaks.items() if p != "memo")
    assert peaks["memo"] <= plan.usable_bytes  # 1M tokens on 8 GPUs: memo
    memo, alpha = plan.estimates["memo"], plan.memory_layout.alpha
    assert 0 < alpha < 0.2 and memo.host == pytest.approx(224 * 2**30)  # the host budget binds
    assert "memo alpha 0.070 (host memory-bound; MEMO's LP" in plan.memo_alpha
    assert 0 < plan.longest["none"] < plan.longest["selective"] < plan.longest["full"] < 131072 < plan.longest["memo"]
    report = dry_run_report(cfg, 8)
    assert "not estimated" not in report
    rows = {line.strip().lstrip("*").split()[0]: line.split() for line in report.splitlines()
            if line.rstrip().endswith(" tokens") and line.strip().lstrip("*").split()[:1] in (["none"], ["full"], ["selective"], ["offload"], ["memo"])}
    assert len(rows) == 5 and all("NO" in row and "tokens" in row for p, row in rows.items() if p != "memo"), rows
    assert "yes" in rows["memo"]
    assert "fits: peak <= 90% of 80 GiB" in report and "memo alpha 0.070" in report


def test_dry_run_memory_fits_for_the_1b_config():
    plan = plan_dry_run(load_config(LLAMA, ["cluster.profile=H100-SXM"]), 8)
    assert all(e.peak_bytes <= plan.usable_bytes for e in plan.estimates.values())
    assert all(t >= plan.memory_tokens for t in plan.longest.values())
