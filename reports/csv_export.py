"""CSV export: ``calls.csv``, ``steps.csv``, ``runs.csv``, ``sampling.csv``, ``summary.csv``,
``roofline.csv`` and ``requests.csv``.

Columns are the frames' schema (``probe/schema.py``; documented in ``reports/README.md``),
in schema order. Shapes stay JSON strings (``[[1,7,64]]``): parse them with ``json.loads``,
never ``eval``. A null is an empty cell. Floats are written with their shortest round-trip
representation, so :func:`read_csv` gives back frames equal to the run's.

``roofline.csv`` (per rank, block and phase: FLOPs, bytes, achieved rates, roof fraction,
bound) is written where the run's metadata holds its model config; its roof and bound
columns are empty where no peaks were recorded (see :mod:`reports.cost_view`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd

from probe import schema
from probe.store import replace_atomically

from .cost_view import roofline_columns

if TYPE_CHECKING:  # pragma: no cover
    from probe.analysis.run import Run

    from .cost_view import CostView

Table = Literal["calls", "steps", "runs", "sampling", "summary", "roofline", "requests", "ops", "ledger",
                "allocations"]
TABLES: dict[str, dict[str, str]] = {"calls": schema.CALLS, "steps": schema.STEPS, "runs": schema.RUNS,
                                     "sampling": schema.SAMPLING, "summary": schema.SUMMARY,
                                     "roofline": roofline_columns(), "requests": schema.REQUESTS,
                                     "ops": schema.OPS, "ledger": schema.LEDGER, "allocations": schema.ALLOCATIONS}


def frames_for_csv(run: "Run", view: "CostView | None" = None) -> dict[str, pd.DataFrame]:
    """The tables the export writes, conformed to their schemas.

    ``summary`` is :meth:`Run.summary` at every level (block, role, module): per row and phase
    the calls, inclusive and self ms, mean ms, share of the phase's forward time (of self
    time, so a level's shares add up to 100 %), GPU times and mean output bytes, plus the
    ``(residue)`` row (and ``(probe)``, where recorded) of each phase and level. ``roofline`` is there only
    where the cost estimate is (:func:`reports.cost_view.cost_view`; ``view`` if given).
    """
    from .cost_view import cost_view
    from .text import display_run

    run = display_run(run)  # user strings capped (reports.text); the saved run keeps them whole
    frames = {
        "calls": schema.conform(run.calls, schema.CALLS, whole=True),  # every column, the CUDA ones too
        "steps": schema.conform(run.steps, schema.STEPS),
        "runs": schema.conform(run.runs, schema.RUNS),
        "sampling": schema.conform(run.sampling, schema.SAMPLING),
        "summary": schema.conform(run.summary(), schema.SUMMARY),
    }
    view = cost_view(run) if view is None else view
    if view.has_cost:
        frames["roofline"] = view.roof.astype(TABLES["roofline"])
    if len(run.requests):  # continuous-batching runs only
        frames["requests"] = schema.conform(run.requests, schema.REQUESTS)
    for name in ("ops", "ledger", "allocations"):  # a run with a deep pass only
        if len(getattr(run, name)):
            frames[name] = schema.conform(getattr(run, name), TABLES[name])
    return frames


def write_csv(run: "Run", folder: str | os.PathLike, view: "CostView | None" = None) -> list[Path]:
    """Write the CSV files into ``folder`` (created if needed).

    Args:
        run: the recorded run.
        folder: destination folder.
        view: the run's :func:`reports.cost_view.cost_view`, if the caller has it already.

    Returns:
        The paths written, in the order calls, steps, runs, sampling, summary, then roofline where
        the run has a cost estimate, then requests for a continuous-batching run.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in frames_for_csv(run, view).items():
        path = out / f"{name}.csv"
        # Written to a temporary name and renamed: a reader never sees half a file.
        replace_atomically(path, lambda tmp, df=df: df.to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8"))
        paths.append(path)
    return paths


#: ``pd.read_csv`` arguments that read each float back as written: pandas 2's default parser can
#: miss by an ulp (its round-trip parser is exact); pandas 3's default is exact and the argument
#: deprecated
EXACT_FLOATS: dict = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def read_csv(path: str | os.PathLike, table: Table | None = None) -> pd.DataFrame:
    """Read a CSV written by :func:`write_csv` back with the schema's dtypes.

    Args:
        path: the CSV file.
        table: ``calls``, ``steps``, ``runs``, ``sampling``, ``summary`` or ``roofline``; by default the
            file's stem.

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
    df = pd.read_csv(p, dtype=sch, keep_default_na=False, na_values=[""], encoding="utf-8", **EXACT_FLOATS)
    if name == "roofline":
        return df[list(sch)].astype(sch)
    return schema.conform(df, sch)
