import json
import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def seqpar(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "seqpar.launcher", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("seqpar: error: "), proc.stderr
    return lines[0]


def test_print_cmd_builds_torchrun():
    p = seqpar("train", "configs/tiny-cpu.yaml", "train.steps=5", "--nproc", "2", "--print-cmd")
    assert p.returncode == 0, p.stderr
    cmd = p.stdout.strip()
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m seqpar.train --config configs/tiny-cpu.yaml train.steps=5" in cmd


def test_multi_node_command_uses_c10d_rendezvous():
    p = seqpar("train", "configs/tiny-cpu.yaml", "--nnodes", "2", "--nproc", "2", "--rdzv-endpoint", "node0:29400", "--print-cmd")
    assert p.returncode == 0, p.stderr
    assert "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=node0:29400 --rdzv-id=seqpar --nproc_per_node=2" in p.stdout
    assert "--standalone" not in p.stdout
    assert "needs --rdzv-endpoint" in one_error_line(seqpar("train", "configs/tiny-cpu.yaml", "--nnodes", "2", "--print-cmd"))
    line = one_error_line(seqpar("train", "configs/tiny-cpu.yaml", "parallel.dp=3", "--nnodes", "2", "--nproc", "2", "--rdzv-endpoint", "h:1", "--print-cmd"))
    assert "parallel.dp(3) x parallel.sp(2) = 6 must equal the world size 4" in line


def test_config_errors_are_one_line():
    assert "did you mean 'train.steps'" in one_error_line(seqpar("train", "configs/tiny-cpu.yaml", "train.step=5", "--print-cmd"))
    line = one_error_line(seqpar("train", "configs/tiny-cpu.yaml", "parallel.dp=2", "--nproc", "3", "--print-cmd"))
    assert "must equal the world size 3" in line
    line = one_error_line(seqpar("train", "configs/tiny-cpu.yaml", "model.n_kv_heads=3", "--print-cmd"))
    assert "model.n_heads=4 must be a multiple of model.n_kv_heads=3" in line


def test_adaptive_errors_are_one_line_and_dry_run_describes_the_pool():
    ad = ("configs/tiny-cpu.yaml", "parallel.algorithm=adaptive", "data.mode=varlen")
    line = one_error_line(seqpar("train", *ad, "parallel.dp=2", "--nproc", "4", "--print-cmd"))
    assert "needs parallel.dp=1, got parallel.dp=2" in line
    line = one_error_line(seqpar("train", *ad, "scatter.capacity_tokens=100", "--nproc", "4", "--print-cmd"))
    assert "data.seq_len=512 is longer than the pool can hold: 4 ranks x capacity 100 tokens = 400" in line
    p = seqpar("train", *ad, "model.n_heads=8", "model.n_kv_heads=2", "model.dim=64", "--nproc", "8", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "adaptive  world 8 as one pool: groups of degrees 1,2,4,8" in p.stdout
    assert "ulysses at 2,4,8" in p.stdout and "ring at 2,4,8" in p.stdout
    p = seqpar("train", *ad, "--nproc", "8", "--dry-run")  # 4 heads: no Ulysses over 8 ranks
    assert "ulysses at 2,4 (excluded at 8: Ulysses degree 8 must divide the number of attention heads 4" in p.stdout


def _rank_entry(*overrides):
    return subprocess.run(
        [sys.executable, "-m", "seqpar.train", "--config", "configs/tiny-cpu.yaml", "parallel.sp=1", "parallel.ring=1", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_missing_data_path_is_one_line(tmp_path):
    line = one_error_line(_rank_entry(f"data.path={tmp_path}/nothing", f"run.output_dir={tmp_path}/run"))
    assert "data.path=" in line and "seqpar data prepare" in line


def test_corrupt_idx_is_one_line(tmp_path, small_store):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copy(small_store + ".bin", bad + ".bin")
    with open(small_store + ".idx", "rb") as f:
        head = f.read()
    with open(bad + ".idx", "wb") as f:
        f.write(head[: len(head) // 2])
    line = one_error_line(_rank_entry(f"data.path={bad}", f"run.output_dir={tmp_path}/run"))
    assert "bad.idx" in line and "seqpar data prepare" in line


def test_data_prepare_cli(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hi there"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    p = seqpar("data", "prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "s"), "--quiet")
    assert p.returncode == 0, p.stderr
    assert "3 documents" in p.stdout
    from seqpar.data.store import TokenStore

    store = TokenStore(str(tmp_path / "s"))
    assert store.num_docs == 3 and store.doc(0).tolist() == list(b"hello") + [256]


def test_train_end_to_end_two_ranks(tmp_path, small_store):
    p = seqpar(
        "train",
        "configs/tiny-cpu.yaml",
        f"data.path={small_store}",
        "train.steps=3",
        "data.seq_len=256",
        "data.tokens_per_step=1024",
        f"run.output_dir={tmp_path}/run",
        "--nproc",
        "2",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    steps = [ln for ln in p.stdout.splitlines() if ln.startswith("step ")]
    assert len(steps) == 3 and "tok/s" in steps[0] and "loss" in steps[0] and "eta" in steps[0]
    assert "mfu n/a" in steps[0] and "tflops" in steps[0]  # no known peak for a CPU: never a made-up MFU
    assert "peak n/a" in p.stdout
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "tokens", "tokens_per_s", "grad_norm", "lr"):
        assert key in records[0]
    assert records[0]["tokens"] == 1024  # counted once per token, not once per rank
