"""NCCL failure handling, configured before the process group exists (pure: returns variables).

A dead or stuck peer must fail the job with a message, not hang it until Slurm's time limit:
- the watchdog aborts a collective after the process group's timeout (``parallel.timeout_s``);
- async error handling tears the process down when the watchdog catches an error
  (TORCH_NCCL_ASYNC_ERROR_HANDLING=1), so torchrun or srun sees a failed rank at once;
- the heartbeat monitor kills a rank whose watchdog itself is stuck (e.g. in a CUDA call): its
  timeout must be longer than the collective timeout, or it fires first and the message is lost;
- the flight recorder (``parallel.flight_recorder: N``) keeps each rank's last N collectives and
  dumps them on a timeout, to find the rank that did not arrive
  (``python -m torch.distributed.flight_recorder.fr_trace DIR``).

Variables the user set win (``init_distributed`` applies these with ``setdefault``).
"""

from __future__ import annotations

import math


def nccl_environment(timeout_s: float, flight_recorder: int = 0, dump_prefix: str = "") -> dict[str, str]:
    """TORCH_NCCL_* settings for a run with collective timeout ``timeout_s``; ``flight_recorder``
    entries per rank (0: off) dumped to files named ``dump_prefix`` + rank."""
    env = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(math.ceil(timeout_s) + 120),
    }
    if flight_recorder > 0:
        env.update({
            "TORCH_NCCL_TRACE_BUFFER_SIZE": str(flight_recorder),
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DESYNC_DEBUG": "1",
        })
        if dump_prefix:
            env["TORCH_FR_DUMP_TEMP_FILE"] = dump_prefix
            env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = dump_prefix  # the name older torch reads
    return env
