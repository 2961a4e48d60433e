"""The report of a ``probe sweep`` folder: one offline HTML page and its CSV tables.

Built with the same page machinery as the run report (:class:`reports.html_page.Page`): plotly.js
inlined once, a Content-Security-Policy that admits only the page's own scripts, fixed element
ids (``sweep-prefill``, ``sweep-decode``, ``sweep-throughput``), every string from the sweep
escaped, and nothing that depends on the clock: two builds from one folder are byte-identical.

>>> write_sweep_reports("probe-runs/sweep-1")   # sweep.html, csv/sweep.csv, csv/sweep_summary.csv
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from probe.store import replace_atomically, write_text

from . import cost_figures
from .html_page import Page, esc, format_cell, table_html

#: (element id, section title, builder) of the sweep page's figures, in page order
SWEEP_FIGURES = (
    ("sweep-prefill", "Prefill time vs prompt length", cost_figures.sweep_prefill),
    ("sweep-decode", "Decode time per token vs KV length", cost_figures.sweep_decode),
    ("sweep-throughput", "Decode throughput vs batch size", cost_figures.sweep_throughput),
)
SWEEP_FORMATS: tuple[str, ...] = ("html", "csv")
_FACTS = ("model_id", "model_class", "parameters", "weights_source", "device", "dtype", "prompt_lens", "batch_sizes", "new_tokens", "repeat",
          "warmup", "depth", "created_at")


def sweep_facts(meta: dict, df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key in _FACTS:
        if key in meta and meta[key] is not None:
            v = meta[key]
            rows.append((key, ", ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else format_cell(key, v)))
    rows.append(("recorded", f"{len(df):,} steps, {df.groupby(['prompt_len', 'batch', 'repeat']).ngroups:,} "
                             "generate calls" if len(df) else "no steps"))
    return pd.DataFrame({"fact": [k for k, _ in rows], "value": [v for _, v in rows]}, dtype="string")


def sweep_failures(meta: dict) -> pd.DataFrame:
    fails = [f for f in meta.get("failures", []) or [] if isinstance(f, dict)]
    return pd.DataFrame({
        "prompt_len": pd.Series([f.get("prompt_len") for f in fails], dtype="Int64"),
        "batch": pd.Series([f.get("batch") for f in fails], dtype="Int64"),
        "error": pd.Series([str(f.get("error", "")) for f in fails], dtype="string"),
    })


def sweep_runs(meta: dict) -> pd.DataFrame:
    runs = meta.get("runs") or {}
    items = sorted(runs.items()) if isinstance(runs, dict) else []
    return pd.DataFrame({"config": [str(k) for k, _ in items], "run directory": [str(v) for _, v in items]},
                        dtype="string")


def render_sweep(df: pd.DataFrame, meta: dict | None = None) -> str:
    """The sweep page as a string.

    Args:
        df: the sweep frame (:func:`probe.sweep.sweep` / :func:`probe.sweep.load_sweep`).
        meta: the sweep's ``sweep.json`` (model, device, grid, failures, run folders).
    Returns:
        A complete offline HTML document.
    """
    from probe.routines.sweep import sweep_summary

    from .text import cap, cap_frame, cap_meta

    meta = cap_meta(meta or {})
    df = cap_frame(df)
    model = str(cap(str(meta.get("model_id") or "probe sweep")))
    doc = Page()
    doc.add(f"<h1>probe sweep: {esc(model)}</h1>")
    links = (("summary", "Summary"), *[(i + "-title", t) for i, t, _ in SWEEP_FIGURES], ("configs", "Runs"))
    doc.add("<nav>" + "".join(f'<a href="#{i}">{esc(t)}</a>' for i, t in links) + "</nav>")
    doc.add(table_html(sweep_facts(meta, df), table_id="facts"))
    fails = sweep_failures(meta)
    if len(fails):
        doc.add('<h2 id="failures">Failed configs</h2>')
        doc.add(table_html(fails, table_id="failures-table"))
    from probe.recording.noise import BUSY_THRESHOLD_PCT

    summary = sweep_summary(df)
    busy = summary[summary["wait_pct"] > BUSY_THRESHOLD_PCT]
    if len(busy):
        names = ", ".join(f"p{int(r['prompt_len'])}-b{int(r['batch'])}" for _, r in busy.iterrows())
        doc.add(f'<p class="warn" id="busy-warning"><b>The machine was busy: up to {busy["wait_pct"].max():.0f} % '
                f"of step time was spent waiting for a CPU ({esc(names)}); rerun on a quiet machine or with more "
                "<code>--repeat</code>.</b></p>")
    doc.add('<h2 id="summary">Summary</h2>')
    doc.add(table_html(summary, caption="Per prompt length and batch: medians over the repeats, with min and max",
                       table_id="sweep-summary-table"))
    doc.add('<p class="note">prefill_ms: the prefill step\'s latency (forward + choosing the first token); '
            "decode_ms_per_token: the mean decode-step latency; tok/s count every sequence of the batch; _min and _max: "
            "the spread over the repeats; wait_pct: share of step time the config's run spent waiting for a CPU "
            f"(a busy machine above {BUSY_THRESHOLD_PCT:.0f} %).</p>")
    for div_id, title, build in SWEEP_FIGURES:
        doc.figure(build(df), div_id, title)
    doc.add('<h2 id="configs">Runs</h2>')
    doc.add('<p class="note">Each config\'s recorded run, relative to the sweep folder; '
            "<code>probe report SWEEP/RUN_DIR</code> reports one of them.</p>")
    doc.add(table_html(sweep_runs(meta), table_id="runs-table"))
    return doc.render(f"probe sweep: {model}")


def write_sweep_reports(sweep_dir: str | os.PathLike, formats: Iterable[str] = SWEEP_FORMATS,
                        out: str | os.PathLike | None = None) -> list[Path]:
    """Write the reports of a sweep folder (``sweep.parquet`` + ``sweep.json``).

    Args:
        sweep_dir: the folder ``probe sweep --out`` wrote.
        formats: any of ``"html"`` (``sweep.html``) and ``"csv"`` (``csv/sweep.csv``: the
            frame, one row per recorded step; ``csv/sweep_summary.csv``: medians per config).
        out: as for :func:`reports.write_reports`: the file (html) or folder (csv) of a single
            format, else a folder used in place of ``sweep_dir``.
    Returns:
        The paths written (HTML, then the CSV files).
    Raises:
        ValueError: an unknown format, or a folder that holds no readable sweep.
    """
    from probe.routines.sweep import load_sweep, sweep_summary

    fmts = list(dict.fromkeys(formats))
    bad = [f for f in fmts if f not in SWEEP_FORMATS]
    if bad or not fmts:
        raise ValueError(f"a sweep's formats are a non-empty subset of {SWEEP_FORMATS}; got {list(formats)!r} "
                         "(for a trace, report one of its runs: SWEEP/runs/p{P}-b{B})")
    df, meta = load_sweep(sweep_dir)
    root = Path(sweep_dir)
    single = Path(out) if out is not None and len(fmts) == 1 else None
    if out is not None and single is None:
        root = Path(out)
    paths: list[Path] = []
    if "html" in fmts:
        path = single or root / "sweep.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, render_sweep(df, meta))
        paths.append(path)
    if "csv" in fmts:
        folder = single or root / "csv"
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in (("sweep", df), ("sweep_summary", sweep_summary(df))):
            path = folder / f"{name}.csv"
            replace_atomically(path, lambda tmp, frame=frame: frame.to_csv(tmp, index=False, lineterminator="\n",
                                                                           encoding="utf-8"))
            paths.append(path)
    return paths
