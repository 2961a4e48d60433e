"""The dashboard's table pages: Shapes (each block's input and output shapes for prefill and
decode) and Data (every frame and summary, paged and filtered, with CSV and HTML report downloads
built on click).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import streamlit as st

import probe
from probe.reports import figures

from . import data
from .context import Context, show_table


def _calls_by_position(calls: pd.DataFrame) -> list[list[str]]:
    """Run ids of the recorded calls grouped by position: the n-th call of every rank together.

    One rank: one id per group. Ranks record the same generate calls side by side, each under
    its own run id, so the n-th of each rank belong together.
    """
    if calls.empty:
        return []
    if "rank" not in calls.columns:
        return [[str(v)] for v in calls["run_id"].dropna().unique()]
    pairs = calls[["rank", "run_id"]].dropna().drop_duplicates()
    per_rank = [[str(v) for v in g["run_id"]] for _, g in pairs.groupby("rank", sort=True)]
    n = max((len(ids) for ids in per_rank), default=0)
    return [[ids[i] for ids in per_rank if i < len(ids)] for i in range(n)]


def shapes(ctx: Context) -> None:
    """The shape walkthrough: each block's input/output shapes for prefill and decode
    (for every rank, with a rank column, when the runs merge several)."""
    calls = ctx.run.calls
    groups = ctx.memo("run_id_groups", lambda: _calls_by_position(calls))
    names = ctx.names()
    labels = [" / ".join(dict.fromkeys(names.get(i, i) for i in g)) + (f" ({' / '.join(g)})" if names else "")
              for g in groups]
    pick = st.selectbox("Generate call", labels, key="shapes_run") if len(labels) > 1 else None
    ids = None if pick is None else groups[labels.index(pick)]
    walk = ctx.memo("shapes", lambda: figures.shape_walkthrough(
        calls if ids is None else calls[calls["run_id"].isin(ids)]), pick)
    if walk.empty:
        unfiltered = ctx.filters == data.Filters()
        st.info("The selected runs recorded no calls." if unfiltered else "No calls match the filters.")
        return
    per_rank = "rank" in walk.columns
    st.caption("Input and output shapes of each block in the prefill step and the first decode step"
               + (", for every rank (a sharded block shows each rank's width)" if per_rank else ""))
    show_table(walk, "shapes_table")


def _tables(run: probe.Run) -> dict[str, Callable[[], pd.DataFrame]]:
    return {
        "calls": lambda: run.calls,
        "steps": lambda: run.steps,
        "runs": lambda: run.runs,
        "summary by block": lambda: run.summary("block"),
        "summary by role": lambda: run.summary("role"),
        "summary by module": lambda: run.summary("module"),
        "call tree": lambda: run.tree(),
        "phase summary": run.phase_summary,
        "sampling": lambda: run.sampling,
        "sampling summary": run.sampling_summary,
        "block memory": lambda: data.block_memory(run.calls),
    }


def data_view(ctx: Context) -> None:
    """Filterable tables, paged, with CSV downloads and the HTML report of a run."""
    tables = _tables(ctx.run)
    name = st.selectbox("Table", list(tables), key="data_table")
    # the raw frames are shown as they are; derived tables are computed once per filter
    df = tables[name]() if name in ("calls", "steps", "runs") else ctx.memo("table", tables[name], name)
    pages = max(1, -(-len(df) // data.PAGE_ROWS))
    if st.session_state.get("data_page", 1) > pages:  # fewer rows since the filters changed
        st.session_state["data_page"] = pages
    number = int(st.number_input(f"Page (of {pages:,})", min_value=1, max_value=pages, step=1, key="data_page"))
    shown = data.page(df, number - 1)
    show_table(shown, "data_table_view", raw=name in ("calls", "steps", "runs"))
    first = (number - 1) * data.PAGE_ROWS
    st.caption(f"Rows {first + 1 if len(df) else 0:,}-{first + len(shown):,} of {len(df):,} "
               "(the sidebar filters apply)")
    # built on click, in Streamlit's download thread: a 1M-row CSV takes seconds to write.
    # on_click="ignore": a download changes nothing on the page, so no rerun.
    st.download_button(f"Download {name} as CSV ({len(df):,} rows)", data=lambda: data.csv_bytes(df),
                       file_name=f"{name.replace(' ', '_')}.csv", mime="text/csv", key="data_csv",
                       on_click="ignore")
    st.subheader("HTML report")
    pick = st.selectbox("Run", ctx.selected, key="data_report_run") if len(ctx.selected) > 1 else ctx.selected[0]
    run = ctx.loaded[pick]
    st.caption("The self-contained offline report of the whole run (sidebar filters do not apply).")
    file_name = "report.html" if pick == "." else f"{Path(pick).name}-report.html"
    st.download_button("Download the HTML report", data=lambda: data.report_html(run), file_name=file_name,
                       mime="text/html", key="data_report", on_click="ignore")
