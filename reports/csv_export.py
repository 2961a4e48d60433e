"""CSV export: ``calls.csv``, ``steps.csv``, ``runs.csv`` and ``summary.csv``.

Columns are the frames' schema (``probe/schema.py``; documented in ``reports/README.md``),
in schema order. Shapes stay JSON strings (``[[1,7,64]]``): parse them with ``json.loads``,
never ``eval``. A null is an empty cell. Floats are written with their shortest round-trip
representation, so :func:`read_csv` gives back frames equal to the run's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd

from probe import schema

if TYPE_CHECKING:  # pragma: no cover
    from probe.run import Run

Table = Literal["calls", "steps", "runs", "summary"]
TABLES: dict[str, dict[str, str]] = {"calls": schema.CALLS, "steps": schema.STEPS, "runs": schema.RUNS,
                                     "summary": schema.SUMMARY}


def frames_for_csv(run: "Run") -> dict[str, pd.DataFrame]:
    """The four tables the export writes, conformed to their schemas.

    ``summary`` is :meth:`Run.summary` by module: per block x phase the calls, total and mean
    ms, share of the phase's forward time, GPU total and mean output bytes, plus the
    ``(residue)`` and ``(outside model)`` rows of each phase.
    """
    return {
        "calls": schema.conform(run.calls, schema.CALLS),
        "steps": schema.conform(run.steps, schema.STEPS),
        "runs": schema.conform(run.runs, schema.RUNS),
        "summary": schema.conform(run.summary(by="module"), schema.SUMMARY),
    }


def write_csv(run: "Run", folder: str | os.PathLike) -> list[Path]:
    """Write the four CSV files into ``folder`` (created if needed).

    Args:
        run: the recorded run.
        folder: destination folder.

    Returns:
        The paths written, in the order calls, steps, runs, summary.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in frames_for_csv(run).items():
        path = out / f"{name}.csv"
        # Written to a temporary name and renamed: a reader never sees half a file.
        tmp = path.with_name(f".{path.name}.tmp")
        df.to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def read_csv(path: str | os.PathLike, table: Table | None = None) -> pd.DataFrame:
    """Read a CSV written by :func:`write_csv` back with the schema's dtypes.

    Args:
        path: the CSV file.
        table: ``calls``, ``steps``, ``runs`` or ``summary``; by default the file's stem.

    Returns:
        A frame equal to the exported one (empty cells are nulls).
    """
    p = Path(path)
    name = table or p.stem
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; pass table= one of {sorted(TABLES)}")
    sch = TABLES[name]
    # Without keep_default_na=False a module or model literally named "NA" or "None" would
    # read back as null; only empty cells are nulls in this export.
    df = pd.read_csv(p, dtype=sch, keep_default_na=False, na_values=[""], encoding="utf-8")
    return schema.conform(df, sch)
