"""Checkpoints through ``torch.distributed.checkpoint``: atomic, automatic resume, resharding.

Layout of ``RUN_DIR/checkpoints``::

    step_000010/           complete checkpoint (DCP shards + meta.json, written last)
    .tmp-step_000012/      a save in progress, or one killed mid-write: never resumed from

Every rank writes its shards into the temporary directory; after a barrier rank 0 writes
``meta.json`` and renames the directory, so a directory named ``step_*`` is always complete.
Model and optimizer go through DCP's state-dict API, which reshards on load: a checkpoint
written with dp=2 loads on dp=1 (and FSDP onto replication or back).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STEP_DIR = re.compile(r"^step_(\d{6,})$")
META = "meta.json"


@dataclass
class ResumeState:
    """What the loop needs besides model and optimizer: where it was."""

    step: int  # optimizer steps completed
    streams_consumed: int  # global stream index of the next step's first stream
    scheduler: dict[str, Any]
    meta: dict[str, Any]
    path: str


def _fsync_dir(path: str) -> None:
    """Make a rename durable: fsync the directory that holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and restores training state under ``run_dir/checkpoints`` (collective over ``group``)."""

    def __init__(self, run_dir: str, keep_latest: int, group: dist.ProcessGroup | None = None) -> None:
        self.dir = os.path.join(run_dir, "checkpoints")
        self.keep_latest = keep_latest
        self.group = group
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    # -- discovery ------------------------------------------------------------------------

    def complete(self) -> list[tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.dir):
            return []
        found = []
        for name in os.listdir(self.dir):
            m = STEP_DIR.match(name)
            path = os.path.join(self.dir, name)
            if m and os.path.isfile(os.path.join(path, META)):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1][1] if done else None

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    # -- save ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        streams_consumed: int,
        meta: dict[str, Any],
        fault_hook=None,
    ) -> str:
        """Write checkpoint ``step`` atomically; returns its final path. Collective."""
        name = f"step_{step:06d}"
        final = os.path.join(self.dir, name)
        tmp = os.path.join(self.dir, f".tmp-{name}")
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self._barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, process_group=self.group)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        if fault_hook is not None:
            fault_hook("mid_save", step)
        self._barrier()
        if self.rank == 0:
            record = {
                **meta,
                "step": step,
                "streams_consumed": streams_consumed,
                "scheduler": scheduler.state_dict(),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            }
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(record, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # a re-run of the same step after a resume
                self._remove(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            self._prune()
        self._barrier()
        return final

    def _remove(self, path: str) -> None:
        # Rename first: a half-deleted directory must never still look like a complete checkpoint.
        doomed = os.path.join(self.dir, f".del-{os.path.basename(path)}-{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self) -> None:
        done = self.complete()
        for _, path in done[: max(0, len(done) - self.keep_latest)]:
            self._remove(path)

    def clean_partial(self) -> None:
        """Remove leftovers of saves or deletions that never completed (rank 0 only, at start-up)."""
        if self.rank == 0 and os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                if name.startswith((".tmp-", ".del-")):
                    shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    # -- load ----------------------------------------------------------------------------

    def load(self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ResumeState:
        """Restore model and optimizer (resharded to the current layout) and return the loop state."""
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path, process_group=self.group)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=True),
        )
        rng = os.path.join(path, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng):  # absent when resuming onto more ranks than were saved
            _set_rng_state(torch.load(rng, weights_only=False))
        return ResumeState(
            step=int(meta["step"]),
            streams_consumed=int(meta["streams_consumed"]),
            scheduler=meta["scheduler"],
            meta=meta,
            path=path,
        )
