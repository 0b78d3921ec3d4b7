"""torchrun without its failure report for seqpar's own errors.

    python -m seqpar.launcher.torchrun_quiet --standalone --nproc_per_node=2 -m seqpar.train --config C

The same as ``python -m torch.distributed.run`` (what ``seqpar train`` prints), except when ranks
fail: a rank that exits with 2 (a configuration or input error) or 3 (a training error) has
already printed its one line, so torchrun's 40-line ``ChildFailedError`` traceback and failure
table would only bury it; this exits with that code instead. Any other failure (a Python
traceback, a signal) gets one line per failed rank. The elastic agent's own log lines stay at
ERROR unless LOGLEVEL says otherwise.
"""

from __future__ import annotations

import os
import signal
import sys

#: Exit codes of seqpar.train that come with their own one-line message.
OWN_ERRORS = {2: "configuration or input error", 3: "training error"}


def describe(rank: int, exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"rank {rank} was killed by {name}"
    return f"rank {rank} exited with code {exitcode}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LOGLEVEL", "ERROR")  # read when torch's elastic loggers are created (import)
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # "failed (exitcode: 2) local_rank: 0 ..." is logged at ERROR: a seqpar error line says it better
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        own = [c for c in codes.values() if c in OWN_ERRORS]
        if own:
            return max(own)  # the ranks printed why; the ranks torchrun stopped after them add nothing
        for rank, code in sorted(codes.items()):
            print(f"seqpar: error: {describe(rank, code)} (its output is above)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
