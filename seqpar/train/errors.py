"""The trainer's one-line errors: what went wrong, on which rank and step, and what to do."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, checkpoint that does not fit); the message says why."""


class CollectiveFailure(TrainingError):
    """A collective timed out (parallel.timeout_s) or lost its peer: some rank stalled or died.

    Raised on the ranks that saw it, which need not include rank 0, so every rank reports it.
    """


def collective_failure(e: RuntimeError, rank: int, step: int, timeout_s: float, last: str | None) -> TrainingError | None:
    """The one-line error for a backend exception that means a stuck or dead peer, else None.

    gloo raises plain RuntimeErrors and NCCL DistBackendErrors (also RuntimeErrors), so the message
    text decides: a timeout (gloo's, or NCCL's watchdog: "Watchdog caught collective operation
    timeout"), or a lost peer (gloo's closed connection, NCCL's remote error or aborted communicator).
    """
    text = str(e).lower()
    resume = f"last checkpoint: {last or 'none'} (rerun the same command to resume)"
    if "timed out" in text or "timeout" in text:
        return CollectiveFailure(
            f"rank {rank}: a collective timed out at step {step} after parallel.timeout_s={timeout_s:g} s: another "
            f"rank stalled or died; {resume}; raise parallel.timeout_s if steps are legitimately that slow"
        )
    nccl_lost = "nccl" in text and any(w in text for w in ("remote", "aborted", "unhandled system error", "communicator"))
    if "connection closed by peer" in text or "connection reset" in text or nccl_lost:
        return CollectiveFailure(f"rank {rank}: lost a peer at step {step}: another rank failed or was stopped "
                                 f"(see its error); {resume}")
    return None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (DCP's CheckpointException: its first failure's)."""
    text = str(e).strip()
    failures = getattr(e, "failures", None)
    if failures:  # DCP's CheckpointException: {rank: (exception, traceback)}
        first = next(iter(failures.values()))
        text = str(first[0] if isinstance(first, tuple) else first)
    return (text.splitlines() or ["unknown error"])[0][:240]
