"""Per-step metrics: one fixed-format line on rank 0 and the same values in metrics.jsonl."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import IO

import torch


def memory_gib(device: torch.device) -> dict[str, float]:
    """Peak device memory on CUDA (allocated, reserved); peak resident set size on CPU, in GiB."""
    if device.type == "cuda":
        return {
            "mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
        }
    # ru_maxrss is KiB on Linux.
    return {"mem_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _fmt_gib(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes step records. Only the rank given ``enabled=True`` (rank 0) prints or writes."""

    def __init__(
        self, run_dir: str, total_steps: int, enabled: bool, stream: IO[str] | None = None, tensorboard: bool = False
    ) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self._file = None
        self._start = time.perf_counter()
        self._steps_timed = 0
        self._time_sum = 0.0
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._file = open(self.path, "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ImportError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written before a crash, redone after resume)."""
        if not self.enabled:
            return
        self._file.close()
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a crash
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def log(self, record: dict, mfu: str = "n/a", print_line: bool = True) -> None:
        """record needs step, loss, grad_norm, lr, tokens, step_time_s; tokens_per_s and eta are added."""
        # The first step pays for warm-up (allocations, first-touch), so the ETA ignores it.
        if record["step"] > 1:
            self._steps_timed += 1
            self._time_sum += record["step_time_s"]
        avg = self._time_sum / self._steps_timed if self._steps_timed else record["step_time_s"]
        record["tokens_per_s"] = record["tokens"] / max(record["step_time_s"], 1e-9)
        record["eta_s"] = avg * (self.total_steps - record["step"])
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])
        if print_line:
            width = len(str(self.total_steps))
            mem = record.get("mem_peak_gib", 0.0)
            print(
                f"step {record['step']:>{width}}/{self.total_steps} | loss {record['loss']:.4f} | "
                f"grad_norm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | "
                f"tok/s {record['tokens_per_s']:,.0f} | tflops {record.get('tflops_per_s', 0.0):.3f} | mfu {mfu} | "
                f"mem {mem:.2f} GiB"
                + (f" (host {_fmt_gib(record['host_peak_gib'])} offloaded)" if "host_peak_gib" in record else "")
                + f" | data {record.get('data_wait_s', 0.0):.2f}s | eta {_fmt_duration(record['eta_s'])}"
                + (f" | plan {record['degrees']} pred {record['predicted_step_s']:.2f}s wait {record['plan_wait_s']:.2f}s"
                   if "degrees" in record else "")
                + (" | skipped (non-finite)" if record.get("skipped") else ""),
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
