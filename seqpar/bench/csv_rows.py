"""CSV output shared by the benchmarks: one line per row, empty cells where nothing was measured."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence


def csv_cell(x: float | int | str | bool) -> str:
    """A float with 6 significant digits ("" for NaN / inf: not measured); anything else as str."""
    if isinstance(x, float):
        return f"{x:.6g}" if math.isfinite(x) else ""
    return str(x)


def write_rows(path: str, fields: Sequence[str], rows: Iterable[Sequence[float | int | str | bool]]) -> str:
    """Write a header of ``fields`` and one line per row of values; returns path."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for row in rows:
            w.writerow([csv_cell(x) for x in row])
    return path
