"""The dashboard's "Inside each block" view: a deep pass's ops per block and phase, the memory
ledger and the live tensor bytes over each sampled step, with the report's builders
(:mod:`reports.deep_section`, :mod:`probe.analysis.ops`)."""

from __future__ import annotations

from typing import Callable

import streamlit as st

from .context import Context, md, show_chart, show_table

VIEW = "Inside each block"


def inside(ctx: Context) -> None:
    """Each block's ops (ms and FLOPs per sampled step, with its dispatch and Python) and its
    memory ledger, per phase, for a run with a deep pass."""
    from probe.analysis.ops import dispatch_unknown, memory_ledger, op_summary
    from probe.reports.deep_section import PHASES, folded, ledger_figures, live_bytes_figure, op_figures

    name = ctx.pick(lambda r: not r.ops.empty, "deep_run",
                    "None of the selected runs has a deep pass. Record one with `probe run --deep --out FOLDER/NAME` "
                    "or `probe.attach(model, deep=True)`.")
    if name is None:
        return
    run = ctx.loaded[name]
    memo = lambda what, build: ctx.memo(what, build, runs=(name,))  # noqa: E731
    deep = run.meta.get("deep") or {}
    st.caption(md(f"Sampled: {deep.get('sampled', '?')}; not timed. Op times are each op alone, per sampled step; "
                  "(dispatch and Python) is the block's time on timed steps of the same shapes less its ops."))
    by = st.radio("Ops by", ["block", "module"], key="deep_by", horizontal=True)
    each = st.checkbox("Every numbered block apart (else the layers fold into one row, their mean per layer)",
                       key="deep_each")

    def ops_table():
        t = op_summary(run.ops, run.calls, by=by)
        return t if each else folded(t, op_figures(t), ["op"])

    def ledger_table():
        t = memory_ledger(run.ledger, run.ops, deep.get("tied_weights"), run.calls)
        return t if each or t.empty else folded(t, ledger_figures(t), [])

    table = memo(f"deep_ops_{by}_{each}", ops_table)
    unknown = by == "block" and memo("deep_dispatch_unknown", lambda: dispatch_unknown(op_summary(run.ops, run.calls)))
    if unknown:
        st.warning(md(unknown[0].upper() + unknown[1:] + "."))
    for phase in PHASES:
        part = table[table["phase"] == phase].drop(columns="phase")
        if len(part):
            st.subheader(phase)
            show_table(part, f"deep_ops_{phase}")
    st.subheader("Memory ledger per block and phase")
    show_table(memo(f"deep_ledger_{each}", ledger_table), "deep_ledger")
    for phase in PHASES:
        part = run.ops[run.ops["phase"] == phase]
        if len(part):
            show_chart(memo(f"deep_live_{phase}", lambda part=part, phase=phase: live_bytes_figure(part, phase)),
                       f"deep_live_{phase}")


VIEWS: dict[str, Callable[[Context], None]] = {VIEW: inside}
