"""Rank discovery on environment dicts: every launcher, and the inconsistent environments."""

import pytest

from seqpar.parallel.discover import (LaunchEnvError, RankInfo, device_index, discover, expand_nodelist, slurm_port,
                                      tasks_on_node)

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node1",
            "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2"}
# what srun exports to task 5 of an 8-task step over gpu[07-08] (4 tasks each); the batch variables too
SLURM = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}
OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


def test_torchrun():
    assert discover(TORCHRUN) == RankInfo(5, 8, 1, 4, "node1", 29500, "torchrun", 2)


def test_torchrun_inside_a_slurm_step_is_torchrun():
    assert discover({**SLURM, **TORCHRUN}).launcher == "torchrun"


def test_slurm_step():
    info = discover(SLURM)
    assert info == RankInfo(5, 8, 1, 4, "gpu07", slurm_port(123456), "slurm", 0)
    assert 20000 <= info.master_port < 30000 and info.master_port == discover({**SLURM, "SLURM_PROCID": "0",
                                                                                "SLURM_LOCALID": "0"}).master_port


def test_slurm_master_port_and_addr_from_the_environment_win():
    info = discover({**SLURM, "MASTER_PORT": "31000", "MASTER_ADDR": "10.0.0.1"})
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 31000)


def test_slurm_restart_count_absent_on_the_first_run():
    assert discover(SLURM).restart_count == 0
    assert discover({**SLURM, "SLURM_RESTART_COUNT": "1"}).restart_count == 1


def test_slurm_batch_shell_is_a_world_of_one():
    """The batch script has SLURM_PROCID=0 and SLURM_NTASKS but no step: do not wait for 8 ranks."""
    batch = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"}
    assert discover(batch) == RankInfo(0, 1, 0, 1, "", 0, "single")


def test_slurm_uneven_nodes():
    env = {**SLURM, "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_PROCID": "4",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    assert discover(env).local_world == 2


def test_open_mpi_and_mpich():
    assert discover(OMPI) == RankInfo(3, 4, 1, 2, "", 0, "openmpi")
    assert discover(MPICH) == RankInfo(1, 2, 1, 2, "", 0, "mpich")
    assert discover({**MPICH, "MASTER_ADDR": "h", "MASTER_PORT": "1234"}).master_port == 1234


def test_pmix_borrows_the_world_size():
    pmix = {"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert discover(pmix) == RankInfo(1, 2, 1, 2, "", 0, "pmix")
    assert discover({"PMIX_RANK": "0"}, mpi_size=1) == RankInfo(0, 1, 0, 1, "", 0, "pmix")
    assert discover({"PMIX_RANK": "3", "SLURM_LOCALID": "1"}, mpi_size=4).world == 4


def test_no_launcher_is_a_world_of_one():
    assert discover({}) == RankInfo(0, 1, 0, 1, "", 0, "single")


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0"}, "RANK and WORLD_SIZE must be set together"),
    ({**TORCHRUN, "RANK": "8"}, r"rank 8 is outside a world of 8 \(torchrun\)"),
    ({**TORCHRUN, "RANK": "-1"}, "rank -1 is outside"),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, "local rank 4 is outside the 4 ranks on this node"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "9"}, "9 ranks on this node .* but a world of 8"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, "LOCAL_RANK is not set"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, "MASTER_ADDR or MASTER_PORT is not set"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0"}, "world size 0"),
    ({**SLURM, "SLURM_PROCID": "8"}, r"rank 8 is outside a world of 8 \(slurm\)"),
    ({**SLURM, "SLURM_LOCALID": "4"}, "local rank 4 is outside the 4 ranks"),
    ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "4(x2"}, "cannot parse SLURM_STEP_TASKS_PER_NODE"),
    ({**SLURM, "SLURM_NODEID": "2"}, "SLURM_NODEID=2 but SLURM_STEP_TASKS_PER_NODE='4\\(x2\\)' lists 2 nodes"),
    ({**SLURM, "SLURM_STEP_NODELIST": "gpu[07-"}, "cannot parse the Slurm node list"),
    ({k: v for k, v in SLURM.items() if "NODELIST" not in k}, "set MASTER_ADDR"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID is not set"),
    ({k: v for k, v in SLURM.items() if k not in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")}, "SLURM_STEP_NUM_TASKS is not set"),
    ({**OMPI, "OMPI_COMM_WORLD_SIZE": ""}, "OMPI_COMM_WORLD_SIZE is not set"),
    ({**OMPI, "OMPI_COMM_WORLD_RANK": "4"}, r"rank 4 is outside a world of 4 \(openmpi\)"),
    ({"PMI_RANK": "0"}, "PMI_SIZE is not set"),
    ({k: v for k, v in MPICH.items() if k != "MPI_LOCALRANKID"}, "MPI_LOCALRANKID is not set"),
    ({"PMIX_RANK": "0"}, "PMIX_RANK is set but no world size is"),
    ({"PMIX_RANK": "1"}, "PMIX_RANK is set but no world size is"),
    ({"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "PMIX_RANK is set but no local rank is"),
])
def test_inconsistent_environments_are_one_line_errors(env, match):
    with pytest.raises(LaunchEnvError, match=match) as e:
        discover(env)
    assert "\n" not in str(e.value)


def test_expand_nodelist():
    assert expand_nodelist("localhost") == ["localhost"]
    assert expand_nodelist("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    assert expand_nodelist("a[1-2]b[08-09]") == ["a1b08", "a1b09", "a2b08", "a2b09"]
    assert expand_nodelist("n-[9-10]") == ["n-9", "n-10"]
    with pytest.raises(LaunchEnvError, match="range '3-1'"):
        expand_nodelist("n[3-1]")


def test_tasks_on_node():
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]


def test_device_index():
    assert device_index(3, 4, 8) == 3  # all of the node's GPUs visible
    assert device_index(3, 4, 1) == 0  # one GPU per task (Slurm --gpus-per-task=1)
    with pytest.raises(LaunchEnvError, match="4 ranks on this node but 2 visible GPUs"):
        device_index(3, 4, 2)  # no silent modulo: two ranks on one GPU
