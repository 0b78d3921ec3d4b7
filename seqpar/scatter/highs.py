"""One HiGHS model from row-wise sparse constraints (shared by the group MILP and the level bound)."""

from __future__ import annotations

import os
import sys

import highspy
import numpy as np

Row = tuple[dict[int, float], float, float]  # {column: coefficient}, lower, upper

_banner_done = False


def new_highs() -> highspy.Highs:
    """``highspy.Highs()`` without HiGHS's banner on standard output.

    The first construction in a process writes "Running HiGHS ... Copyright ..." to file
    descriptor 1 from C++, before ``output_flag`` can be set, so ``contextlib.redirect_stdout``
    cannot catch it and ``seqpar plan --json`` would not print one JSON document. Point fd 1
    at /dev/null for that one construction (later ones print nothing)."""
    global _banner_done
    if _banner_done:
        return highspy.Highs()
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _banner_done = True
    return h


def highs_model(cost, col_lo, col_hi, rows: list[Row], integrality, time_limit_s: float | None,
                **options) -> highspy.Highs:
    """A quiet, single-threaded Highs instance with the model passed in, not yet run.

    cost, col_lo, col_hi, integrality: one entry per column; rows: (coefficients, lower, upper).
    time_limit_s: HiGHS's wall-clock limit; None sets none, so the result depends only on the
    model and the options (HiGHS is deterministic single-threaded: give it a node limit,
    ``mip_max_nodes``, where work must be bounded). Single-threaded so solve times mean the
    same on a shared machine; options go to setOptionValue.
    """
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(col_lo), len(rows)
    lp.col_cost_ = np.asarray(cost, dtype=np.float64)
    lp.col_lower_, lp.col_upper_ = np.asarray(col_lo, dtype=np.float64), np.asarray(col_hi, dtype=np.float64)
    lp.row_lower_ = np.asarray([r[1] for r in rows], dtype=np.float64)
    lp.row_upper_ = np.asarray([r[2] for r in rows], dtype=np.float64)
    starts, index, value = [0], [], []
    for row, _, _ in rows:
        index.extend(row.keys())
        value.extend(row.values())
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.asarray(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.asarray(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray(value, dtype=np.float64)
    lp.integrality_ = integrality
    h = new_highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("time_limit", highspy.kHighsInf if time_limit_s is None else float(time_limit_s))
    for key, val in options.items():
        h.setOptionValue(key, val)
    h.passModel(lp)
    return h
