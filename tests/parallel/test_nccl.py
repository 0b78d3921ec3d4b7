"""NCCL failure handling without a GPU: the variables set before the process group, and the one-line
messages for NCCL's failures (the texts of torch's DistBackendErrors)."""

import pytest

from seqpar.config import ConfigError, load_config
from seqpar.parallel.nccl import nccl_environment
from seqpar.train.errors import CollectiveFailure, collective_failure


def test_heartbeat_outlives_the_collective_timeout_and_async_errors_tear_down():
    env = nccl_environment(600)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > 600  # the watchdog reports before the monitor kills
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in env  # the flight recorder is off by default


def test_flight_recorder_is_one_key():
    env = nccl_environment(30.5, flight_recorder=2000, dump_prefix="/runs/a/flight_recorder/rank_")
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == "/runs/a/flight_recorder/rank_"
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "151"


def test_flight_recorder_key_is_validated():
    assert load_config("configs/tiny-cpu.yaml", ["parallel.flight_recorder=100"]).parallel.flight_recorder == 100
    with pytest.raises(ConfigError, match="parallel.flight_recorder=-1 must be >= 0"):
        load_config("configs/tiny-cpu.yaml", ["parallel.flight_recorder=-1"])


@pytest.mark.parametrize("text,what", [
    ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE, Timeout(ms)=600000) "
     "ran for 600012 milliseconds before timing out.", "timed out at step 7 after parallel.timeout_s=600"),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error, NCCL version 2.21.5\n"
     "ncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.",
     "lost a peer at step 7"),
    ("NCCL communicator was aborted on rank 3.", "lost a peer at step 7"),
])
def test_nccl_failures_name_step_rank_and_checkpoint(text, what):
    failure = collective_failure(RuntimeError(text), 3, 7, 600, "runs/a/checkpoints/step_000006")
    assert isinstance(failure, CollectiveFailure)
    message = str(failure)
    assert message.startswith("rank 3:") and what in message and "last checkpoint: runs/a/checkpoints/step_000006" in message
    assert "\n" not in message


def test_other_errors_are_not_collective_failures():
    assert collective_failure(RuntimeError("CUDA out of memory"), 0, 1, 600, None) is None
