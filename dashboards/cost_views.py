"""The dashboard's cost views: the roofline of a run and the charts of a ``probe sweep``.

Both are built exactly as the reports build them: the roofline from
:func:`reports.cost_view.cost_view` (the roofs stored with the run, else a GPU's datasheet
entry; never a measurement on the machine serving the dashboard), the sweep from
:func:`probe.sweep.load_sweep` and the figures of :mod:`reports.cost_figures`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import streamlit as st

import probe
from probe import fmt
from probe.reports.cost_view import COST_NOTE

from . import data
from .context import Context, cached, md, show_chart, show_table


# --------------------------------------------------------------------------- roofline
def roofline_parts(run: probe.Run) -> dict:
    """Everything the Roofline view shows of ``run``, small enough for ``st.cache_data``.

    The cost estimate annotates every call (the slow part on a big run), so it is built
    once per run and filter choice.
    """
    from probe.analysis.roofline import bound_summary
    from probe.reports.cost_view import cost_view, roofline_figure
    from probe.reports.html_sections import roofline_table
    from probe.reports.tables import ranks

    view = cost_view(run)  # never raises, never measures: a missing piece becomes view.note
    parts: dict = {"view": view, "figure": None, "table": None, "bounds": None, "multi": False}
    if view.has_cost:
        parts["table"] = roofline_table(view)
        parts["multi"] = len(ranks(view.roof)) > 1
    if view.has_roofs:
        parts["figure"] = roofline_figure(view)
        parts["bounds"] = bound_summary(view.roof)
    return parts


def roofline(ctx: Context) -> None:
    """Per block and phase: achieved throughput against the device's roofs, the bound and why."""
    name = ctx.selected[0]
    if len(ctx.selected) > 1:  # each run has its own model config and device: one at a time
        if st.session_state.get("roofline_run") not in ctx.selected:
            st.session_state["roofline_run"] = ctx.selected[0]
        name = st.selectbox("Run", ctx.selected, key="roofline_run")
    run = ctx.run if len(ctx.selected) == 1 else data.apply_filters(ctx.loaded[name], ctx.filters)
    if run.calls.empty and ctx.filters != data.Filters():
        st.info("No calls match the filters.")
        return
    parts = ctx.memo("roofline", lambda: roofline_parts(run), runs=(name,))
    view = parts["view"]
    if not view.has_cost:
        st.info(view.note)
        return
    if view.has_roofs:
        pk = view.peaks
        cols = st.columns(3)
        cols[0].metric("Peak compute", fmt.flop_s(pk.flops_per_s), help=f"{pk.dtype}, dense")
        cols[1].metric("Peak bandwidth", fmt.byte_s(pk.bytes_per_s))
        cols[2].metric("Ridge point", fmt.intensity(pk.ridge_flops_per_byte),
                       help="Above this intensity a block can be compute bound; below it, memory bound")
        st.caption(md(view.peaks_text()))
        show_chart(parts["figure"], "roofline_chart")
    else:
        st.info(view.note)
    if parts["multi"]:
        st.caption("Each rank is set against one device's roofs: the ranks run side by side.")
    st.caption(COST_NOTE)
    show_table(parts["table"], "roofline_table")
    bounds = parts["bounds"]
    if bounds is not None and len(bounds):
        st.caption("Share of block time per bound, by phase")
        show_table(bounds, "roofline_bounds")


# --------------------------------------------------------------------------- sweep
def _sweep_parts(path: Path, name: str) -> dict:
    """Facts, summary, failures, configs and the three charts of the sweep in ``path``.

    Raises:
        ValueError: the folder's sweep cannot be read (:func:`probe.sweep.load_sweep`).
    """
    from probe.routines.sweep import load_sweep, sweep_summary
    from probe.reports.sweep_report import SWEEP_FIGURES, sweep_facts, sweep_failures, sweep_runs

    df, meta = load_sweep(path)
    configs = sweep_runs(meta)
    # the name each config's run has in the sidebar's Runs list (paths relative to the runs folder)
    prefix = "" if name == "." else name + "/"
    configs["run in the dashboard"] = pd.array([prefix + str(d) for d in configs["run directory"]], dtype="string")
    return {
        "facts": sweep_facts(meta, df),
        "summary": sweep_summary(df),
        "failures": sweep_failures(meta),
        "configs": configs,
        "figures": [(div_id, build(df)) for div_id, _, build in SWEEP_FIGURES],
    }


def draw_sweeps(runs_dir: Path, sweeps: dict[str, Path]) -> None:
    """The Sweep view over the sweeps found in the runs folder (``data.Found.sweeps``).

    Args:
        runs_dir: the runs folder (named in the hint when it holds no sweep).
        sweeps: sweep name -> folder; several get a picker.
    """
    if not sweeps:
        st.info(f"No sweep found in {md(runs_dir)} or its sub-folders. Make one with "
                f"`probe sweep --out {runs_dir}/my-sweep` (choose the grid with `--prompt-lens 16,64,256` and "
                "`--batch-sizes 1,4`); its charts show here and each config's run joins the Runs list.")
        return
    names = list(sweeps)
    if st.session_state.get("sweep_pick") not in names:
        st.session_state["sweep_pick"] = names[0]
    name = st.selectbox("Sweep", names, key="sweep_pick") if len(names) > 1 else names[0]
    path = sweeps[name]
    try:
        # keyed on the sweep's two files: a sweep re-run into the same folder is read again
        parts = cached((str(path.expanduser().resolve()), name, data.sweep_signature(path)), "sweep", (),
                      lambda: _sweep_parts(path, name))
    except ValueError as exc:
        st.error(f"Sweep **{md(name)}** cannot be shown: {md(exc)}", icon="⚠️")
        return
    facts = parts["facts"]
    st.caption(md(" · ".join(f"{k}: {v}" for k, v in zip(facts["fact"], facts["value"]))))
    if len(parts["failures"]):
        st.warning(f"{len(parts['failures'])} config(s) of this sweep failed and are missing from the charts.")
        show_table(parts["failures"], "sweep_failures")
    st.caption("Per prompt length and batch: medians over the repeats. prefill_ms: the prefill step's latency "
               "(forward + choosing the first token); decode_ms_per_token: the mean decode-step latency; tok/s "
               "count every sequence of the batch. The sidebar's runs and filters do not apply here.")
    show_table(parts["summary"], "sweep_summary")
    for div_id, fig in parts["figures"]:
        show_chart(fig, div_id)
    st.caption("Each config's recorded run, listed in the sidebar's Runs under the name below: pick it there to "
               "see it in the other views.")
    show_table(parts["configs"], "sweep_configs")


def sweep(ctx: Context) -> None:
    """The charts and summary of a ``probe sweep`` found in the runs folder."""
    draw_sweeps(ctx.runs_dir, ctx.sweeps)


VIEWS: dict[str, Callable[[Context], None]] = {"Roofline": roofline, "Sweep": sweep}
