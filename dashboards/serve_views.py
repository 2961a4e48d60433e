"""The dashboard's Serving view: continuous-batching runs, drawn with the report's figures
(:mod:`reports.serve_figures`): request timeline, batch composition per step, TTFT and ITL
distributions, throughput over time, and block time split into prefill and decode parts."""

from __future__ import annotations

from typing import Callable

import streamlit as st

from . import data
from .context import Context, md, show_chart, show_table


def _split(run):
    """Per serving step, the blocks' time split into prefill and decode parts (or the reason
    there is none)."""
    from probe.analysis.apportion import step_split

    try:
        return step_split(run.apportion()), ""
    except Exception as exc:  # no config saved with the run: no cost model
        return None, f"No prefill/decode split of block time: {exc}"


def serving(ctx: Context) -> None:
    """Requests, packed batches, latency distributions and throughput of a serving run."""
    from probe.reports import serve_figures as sf

    name = ctx.pick(lambda r: not r.requests.empty or (r.runs["kind"] == "serve").any(), "serving_run",
                    "None of the selected runs is a continuous-batching run. Record one with "
                    "`probe serve-bench --out FOLDER/NAME` or `model.generate_batch(...)` under `probe.attach`.")
    if name is None:
        return
    run = data.apply_filters(ctx.loaded[name], ctx.filters)
    memo = lambda what, build: ctx.memo(what, build, runs=(name,))  # noqa: E731
    sv = run.meta.get("serving", {})
    st.caption(md(f"{len(run.requests)} requests, {len(sf.serve_steps(run.steps))} packed forwards; "
                  f"CUDA graphs: {sv.get('cuda_graphs', 'n/a')}"))
    show_table(memo("serve_table", lambda: sf.serve_table(run.requests)), "serving_table")
    show_chart(memo("serve_timeline", lambda: sf.request_timeline(run.requests)), "serving_timeline")
    show_chart(memo("serve_batches", lambda: sf.batch_composition(run.steps)), "serving_batches")
    show_chart(memo("serve_latency", lambda: sf.latency_distributions(run.requests)), "serving_latency")
    show_chart(memo("serve_throughput", lambda: sf.throughput_over_time(run.steps)), "serving_throughput")
    split, note = memo("serve_split", lambda: _split(run))
    if split is None:
        st.info(note)
    else:
        show_chart(sf.mixed_split(split), "serving_split")
        st.caption("Each block call of a mixed step is split between its prefill and decode tokens by the cost "
                   "model's work per token kind, weighted by a time-vs-work line fitted on the run's pure prefill "
                   "and pure decode steps; the parts add up to the measured time.")


VIEWS: dict[str, Callable[[Context], None]] = {"Serving": serving}
