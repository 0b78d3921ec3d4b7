"""Per-rank entry point: ``python -m seqpar.train --config CONFIG [key=value ...]`` (under torchrun or alone)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar.train", description="Train one rank of a seqpar run.")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
    args = parser.parse_args(argv)

    from seqpar.config import ConfigError, load_config
    from seqpar.data.store import StoreError
    from seqpar.parallel.dims import ParallelDimsError
    from seqpar.parallel.discover import LaunchEnvError
    from seqpar.train.errors import TrainingError
    from seqpar.train.trainer import train

    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, ParallelDimsError, StoreError, LaunchEnvError) as e:
        # Every rank hits the same error; one line from rank 0 is enough.
        if _rank() == 0:
            print(f"seqpar: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:
        from seqpar.train.errors import CollectiveFailure

        if _rank() == 0 or isinstance(e, CollectiveFailure):
            print(f"seqpar: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        from seqpar.parallel.init import destroy_distributed

        destroy_distributed()
    return 0


def _rank() -> int:
    """This process's rank as its launcher tells it (torchrun, Slurm, MPI); 0 when that is unreadable,
    so that an inconsistent launch environment is still reported."""
    from seqpar.parallel.discover import LaunchEnvError, discover

    try:
        return discover(os.environ, mpi_size=1).rank
    except LaunchEnvError:
        return 0


def _exit(code: int) -> None:
    """Exit with ``code``. After a failure, exit without interpreter finalization: a collective
    interrupted by the error can leave gloo worker threads holding work objects whose tensors are
    freed during finalization, which aborts the process (SIGABRT, "terminate called without an
    active exception") and hides the exit code. The process group is destroyed and every file is
    closed by then (``main``'s finally blocks), so nothing is lost."""
    if code == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
