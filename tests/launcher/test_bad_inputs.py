"""The bad-input matrix: each bad config, override, data store, decomposition, layout, world size,
environment, checkpoint or launch option gives one line on the terminal that names what to change,
a non-zero exit, and leaves the run directory exactly as it was (README: "Bad input")."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.launcher.test_cli import REPO

TINY = "configs/tiny-cpu.yaml"


def _snapshot(root) -> dict[str, tuple[int, int]] | None:
    """Every file under ``root`` with its size and mtime (None: no such directory)."""
    if not os.path.isdir(root):
        return None
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(d, name))
            out[os.path.relpath(os.path.join(d, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_store):
    """Paths the cases refer to: a store, a truncated store, a decomposition without manifest, a
    broken YAML, and a finished run whose checkpoint the checkpoint cases use."""
    root = tmp_path_factory.mktemp("bad")
    bad = root / "bad"
    shutil.copy(small_store + ".bin", str(bad) + ".bin")
    head = open(small_store + ".idx", "rb").read()
    open(str(bad) + ".idx", "wb").write(head[: len(head) // 2])
    (root / "decomp").mkdir()
    (root / "broken.yaml").write_text("model: [dim: 1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    done = root / "done"
    p = subprocess.run([sys.executable, "-m", "seqpar.train", "--config", TINY, f"data.path={small_store}", "train.steps=2",
                        "parallel.sp=1", "parallel.ring=1", "data.seq_len=256", "data.tokens_per_step=512",
                        f"run.output_dir={done}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return {"root": str(root), "store": small_store, "bad": str(bad), "done": str(done)}


RANK1 = ["parallel.sp=1", "parallel.ring=1", "data.seq_len=256", "data.tokens_per_step=512"]

# (id, argv after `seqpar` or ["-rank", ...] for `python -m seqpar.train --config`, extra env, what the line names)
CASES = [
    ("missing config file", ["train", "{root}/nope.yaml"], {}, "nope.yaml"),
    ("broken YAML", ["train", "{root}/broken.yaml"], {}, "broken.yaml"),
    ("YAML that is not a mapping", ["train", "{root}/list.yaml"], {}, "list.yaml"),
    ("unknown key", ["train", TINY, "train.step=5"], {}, "did you mean 'train.steps'"),
    ("unknown section", ["train", TINY, "trian.steps=5"], {}, "trian"),
    ("value of the wrong type", ["train", TINY, "train.steps=many"], {}, "train.steps"),
    ("negative learning rate", ["train", TINY, "train.lr=-1"], {}, "train.lr"),
    ("heads not a multiple of kv heads", ["train", TINY, "model.n_kv_heads=3"], {}, "model.n_kv_heads=3"),
    ("unknown memory policy", ["train", TINY, "memory.policy=memo2"], {}, "memory.policy"),
    ("alpha out of range", ["train", TINY, "memory.policy=memo", "memory.alpha=1.5"], {}, "memory.alpha"),
    ("unknown attention kernel", ["train", TINY, "kernels.attention=flash3"], {}, "kernels.attention"),
    ("missing store", ["train", TINY, "data.path={root}/nothing", "--nproc", "2"], {}, "seqpar data prepare"),
    ("truncated store index", ["train", TINY, "data.path={bad}", "--nproc", "2"], {}, "bad.idx"),
    ("decomposition that is a store", ["train", TINY, "data.mode=decompose", "data.path={store}", "--nproc", "2"], {},
     "data.mode=decompose"),
    ("decomposition without manifest", ["train", TINY, "data.mode=decompose", "data.path={root}/decomp", "--nproc", "2"],
     {}, "manifest.json"),
    ("dp that does not fill the world", ["train", TINY, "parallel.dp=2", "--nproc", "3"], {}, "world size 3"),
    ("world not a multiple of sp", ["train", TINY, "--nproc", "3"], {}, "sp"),
    ("Ulysses degree that does not divide the heads", ["train", TINY, "parallel.sp=8", "parallel.ulysses=8",
                                                       "parallel.ring=1", "--nproc", "8"], {}, "ulysses"),
    ("adaptive with dp", ["train", TINY, "parallel.algorithm=adaptive", "data.mode=varlen", "parallel.dp=2", "--nproc", "4"],
     {}, "parallel.dp=1"),
    ("--nproc 0", ["train", TINY, "--nproc", "0"], {}, "--nproc 0 must be >= 1"),
    ("--nnodes 0", ["train", TINY, "--nnodes", "0"], {}, "--nnodes=0"),
    ("several nodes without a rendezvous", ["train", TINY, "--nnodes", "2"], {}, "--rdzv-endpoint"),
    ("malformed rendezvous", ["train", TINY, "--nnodes", "2", "--rdzv-endpoint", "node0"], {}, "HOST:PORT"),
    ("--hosts without MPI", ["train", TINY, "--hosts", "a,b"], {}, "--launcher mpi"),
    ("MPI world that disagrees with the config", ["train", TINY, "--launcher", "mpi", "--nproc", "3"], {}, "world size 3"),
    ("RANK without WORLD_SIZE", ["-rank", *RANK1], {"RANK": "0"}, "RANK and WORLD_SIZE"),
    ("a world without a rendezvous", ["-rank", *RANK1], {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_PORT"),
    ("rank outside the world", ["-rank", *RANK1], {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                                   "MASTER_PORT": "29999"}, "rank 2 is outside a world of 2"),
    ("Slurm step with a bad node list", ["-rank", *RANK1], {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                                                            "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "7",
                                                            "SLURM_STEP_NODELIST": "gpu[01-"}, "Slurm node list"),
    ("MPI singleton under a 2-rank launcher", ["-rank", *RANK1], {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0",
                                                                  "MPI_LOCALNRANKS": "2"}, "MPI_COMM_WORLD has 1"),
    ("checkpoints and resume=false", ["-rank", *RANK1, "data.path={store}", "train.steps=2", "checkpoint.resume=false"], {},
     "checkpoint.resume=false"),
    ("checkpoint of another model", ["-rank", *RANK1, "data.path={store}", "train.steps=3", "model.dim=64"], {},
     "does not fit this run"),
    ("submit --nodes 0", ["submit", TINY, "--nodes", "0", "--nproc-per-node", "2", "--time", "10"], {}, "--nodes 0"),
    ("submit with a time Slurm cannot parse", ["submit", TINY, "--nproc-per-node", "2", "--time", "1h"], {}, "--time '1h'"),
    ("submit --mode mpirun", ["submit", TINY, "--nproc-per-node", "2", "--time", "10", "--mode", "mpirun"], {}, "--mode"),
    ("submit --env without a value", ["submit", TINY, "--nproc-per-node", "2", "--time", "10", "--env", "X"], {}, "--env 'X'"),
    ("submit a missing store", ["submit", TINY, "data.path={root}/nothing", "--nproc-per-node", "2", "--time", "10"], {},
     "seqpar data prepare"),
]


@pytest.mark.parametrize("argv,env,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, argv, env, names):
    checkpoint_case = "checkpoint" in names or "does not fit" in names
    run_dir = world["done"] if checkpoint_case else os.path.join(world["root"], "run")
    argv = [a.format(**world) for a in argv]
    if argv[0] == "-rank":
        cmd = [sys.executable, "-m", "seqpar.train", "--config", TINY, *argv[1:]]
    else:
        cmd = [sys.executable, "-m", "seqpar.launcher", *argv]
    cmd.append(f"run.output_dir={run_dir}")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "MPI_"))
             and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    before = _snapshot(run_dir)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**clean, **env})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0, p.stdout + p.stderr
    assert len(lines) == 1 and lines[0].startswith("seqpar: error: "), p.stderr
    assert names in lines[0], lines[0]
    assert "Traceback" not in p.stdout
    assert _snapshot(run_dir) == before  # nothing written or deleted
