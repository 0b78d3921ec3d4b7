"""`seqpar train --launcher mpi`: the mpiexec command (pure), and a 2-rank run under MPICH's Hydra
that equals the same run under torchrun."""

import json
import os

import pytest

from seqpar.launcher.mpi import detect_flavor, mpiexec_cmd
from tests.launcher.test_cli import one_error_line, seqpar

HYDRA = "HYDRA build details:\n    Version:                                 5.0.2\n"
OPEN_MPI = "mpiexec (Open MPI) 4.1.5\n\nReport bugs to https://www.open-mpi.org/community/help/\n"


def test_flavor_from_the_version_text():
    assert detect_flavor(HYDRA) == "mpich" and detect_flavor(OPEN_MPI) == "openmpi"
    with pytest.raises(ValueError, match="names neither Open MPI nor MPICH"):
        detect_flavor("srun 23.11")


def test_hydra_command():
    cmd = mpiexec_cmd("c.yaml", ["train.steps=3"], 4, flavor="mpich", hosts="a,b", python="/py", env={"PATH": "/x"})
    assert cmd == ["mpiexec", "-n", "4", "-hosts", "a,b", "/py", "-m", "seqpar.train", "--config", "c.yaml", "train.steps=3"]


def test_open_mpi_command_forwards_the_environment_and_runs_as_root():
    env = {"PATH": "/x", "OMP_NUM_THREADS": "1", "NCCL_DEBUG": "INFO", "HOME": "/root", "SEQPAR_SLURM_TESTS": "1"}
    cmd = mpiexec_cmd("c.yaml", [], 2, flavor="openmpi", python="/py", env=env, as_root=True)
    assert cmd[:4] == ["mpiexec", "-np", "2", "--allow-run-as-root"]
    forwarded = [cmd[i + 1] for i, c in enumerate(cmd) if c == "-x"]
    assert forwarded == ["NCCL_DEBUG", "OMP_NUM_THREADS", "PATH", "SEQPAR_SLURM_TESTS"]  # not HOME
    assert "--allow-run-as-root" not in mpiexec_cmd("c.yaml", [], 2, flavor="openmpi", env=env)


def test_bad_nproc_and_flavor():
    with pytest.raises(ValueError, match="--nproc=0 must be >= 1"):
        mpiexec_cmd("c.yaml", [], 0, flavor="mpich")
    with pytest.raises(ValueError, match="MPI flavor 'lam'"):
        mpiexec_cmd("c.yaml", [], 2, flavor="lam")


def test_hosts_needs_the_mpi_launcher():
    line = one_error_line(seqpar("train", "configs/tiny-cpu.yaml", "--hosts", "a,b", "--print-cmd"))
    assert "--hosts goes with --launcher mpi" in line


def _losses(run_dir):
    return [json.loads(ln)["loss"] for ln in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_mpi_run_equals_torchrun(tmp_path, small_store):
    import mpi4py  # noqa: F401  (the test extra installs mpi4py and MPICH: missing is a failure, not a skip)
    common = ["train", "configs/tiny-cpu.yaml", f"data.path={small_store}", "train.steps=3", "data.seq_len=256",
              "data.tokens_per_step=1024", "--nproc", "2"]
    mpi = seqpar(*common, f"run.output_dir={tmp_path}/mpi", "--launcher", "mpi")
    assert mpi.returncode == 0, mpi.stdout + mpi.stderr
    assert mpi.stdout.splitlines()[0].split()[1:3] == ["-n", "2"]  # Hydra's spelling
    assert "launcher mpich" in mpi.stdout and "world 2 = dp 1 x sp 2" in mpi.stdout
    ref = seqpar(*common, f"run.output_dir={tmp_path}/torchrun")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert "launcher torchrun" in ref.stdout
    assert _losses(tmp_path / "mpi") == pytest.approx(_losses(tmp_path / "torchrun"), rel=1e-6)
