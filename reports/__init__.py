"""Reports of a recorded run: CSV files, one offline HTML page, a Chrome trace.

>>> from reports import write_reports
>>> write_reports(run, "runs/first")                      # report.html + csv/*.csv
>>> write_reports(run, "runs/first", formats=("trace",))  # trace.json for Perfetto
>>> write_sweep_reports("sweeps/first")                   # sweep.html + csv/ of a `probe sweep` folder

Needs plotly (``pip install 'genprobe[report]'``). The figure builders in
:mod:`reports.figures` are shared with the dashboard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

if TYPE_CHECKING:  # pragma: no cover
    from probe.analysis.run import Run

Format = Literal["html", "csv", "trace"]
FORMATS: tuple[str, ...] = ("html", "csv", "trace")

__all__ = ["FORMATS", "write_reports", "write_sweep_reports"]



def write_reports(run: "Run", run_dir: str | os.PathLike, formats: Iterable[Format] = ("html", "csv"),
                  out: str | os.PathLike | None = None) -> list[Path]:
    """Write the reports of ``run``.

    Args:
        run: the recorded run (``probe.load(run_dir)`` or ``Probe.run``); a run merged from
            several ranks (``probe.load`` of a folder of ``rank0/``, ``rank1/`` ...) too.
        run_dir: the run's folder (for a merged run, the folder above the ranks); the default
            home of the reports: ``run_dir/report.html``, ``run_dir/csv/*.csv`` and
            ``run_dir/trace.json``.
        formats: any of ``"html"``, ``"csv"``, ``"trace"``.
        out: with one ``html`` or ``trace`` format, the file to write; with ``csv`` alone, the
            folder for the CSV files; with several formats, a folder used in place of
            ``run_dir`` (``out/report.html``, ``out/csv/``, ``out/trace.json``).

    Returns:
        The paths written (HTML, then the CSV files — ``roofline.csv`` last, where the run
        holds a model config — then the trace).

    Raises:
        ValueError: an unknown or empty ``formats``.
    """
    fmts = list(dict.fromkeys(formats))
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}; got {list(formats)!r}")
    from .text import display_run

    run = display_run(run)  # user strings capped, as every report shows them
    root = Path(run_dir)
    single = Path(out) if out is not None and len(fmts) == 1 else None
    if out is not None and single is None:
        root = Path(out)
    paths: list[Path] = []
    view = None
    if "html" in fmts or "csv" in fmts:
        from .cost_view import cost_view

        view = cost_view(run)  # once for both: the cost estimate is the slow part of a big run
    if "html" in fmts:
        from .html import write_html

        paths.append(write_html(run, single or root / "report.html", view=view))
    if "csv" in fmts:
        from .csv_export import write_csv

        paths.extend(write_csv(run, single or root / "csv", view=view))
    if "trace" in fmts:
        from .trace import write_trace

        paths.append(write_trace(run, single or root / "trace.json"))
    return paths


def write_sweep_reports(sweep_dir: str | os.PathLike, formats: Iterable[str] = ("html", "csv"),
                        out: str | os.PathLike | None = None) -> list[Path]:
    """Write the reports of a ``probe sweep`` folder: see :func:`reports.sweep_report.write_sweep_reports`."""
    from .sweep_report import write_sweep_reports as write

    return write(sweep_dir, formats=formats, out=out)
