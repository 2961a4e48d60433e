"""The dashboard's Overview page: prefill vs decode side by side, what was generated, the headline
numbers per generate call, the time per block and one step broken down, the spread over repeats.

Figures come from :mod:`reports.figures` (shared with the HTML report).
"""

from __future__ import annotations

import inspect
from dataclasses import astuple
from typing import Any, Callable

import pandas as pd
import streamlit as st

from probe import fmt
from probe.analysis.headline import TOKENS_NOTE, headline_cells, sequences
from probe.reports import figures
from probe.reports.tables import per_rank_summary
from probe.reports.text import MAX_LONG_TEXT, cap, run_prompt

from .context import Context, md, named_headline, show_chart, show_table


def model_lines(runs: pd.DataFrame) -> list[str]:
    """One line per distinct model in a runs frame: name, parameters, where the weights came from."""
    cols = [c for c in ("model_id", "parameters", "weights_source") if c in runs.columns]
    if runs.empty or "model_id" not in cols:
        return []
    lines = []
    for _, r in runs[cols].drop_duplicates().iterrows():
        parts = [str(r["model_id"]) if not pd.isna(r["model_id"]) else "unnamed model"]
        if not pd.isna(r.get("parameters")):
            parts.append(f"{int(r['parameters']) / 1e6:,.1f}M parameters")
        if not pd.isna(r.get("weights_source")):
            parts.append(f"weights: {r['weights_source']}")
        lines.append(" · ".join(parts))
    return lines


def phases_long(cells: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Several runs' :func:`probe.headline.headline_cells` as one table: a row per run and part."""
    rows = [c.T.rename_axis("part").reset_index().assign(run=name) for name, c in cells.items() if not c.empty]
    if not rows:
        return pd.DataFrame()
    out = pd.concat(rows, ignore_index=True).fillna("")
    return out[["run", "part", *[c for c in out.columns if c not in ("run", "part")]]]


def _kwargs(fn: Callable, **kw: Any) -> dict:
    """``kw`` less what this Streamlit's ``fn`` does not take (``streamlit>=1.35`` predates
    ``st.table``'s ``width`` and ``hide_index`` and ``st.code``'s ``wrap_lines``)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def _right(df: pd.DataFrame, text: tuple[str, ...] = ()):
    """``df`` styled with its figures right-aligned (the ``text`` columns left), so digits line up,
    and never broken between a number and its unit (a no-break space: cells are Markdown)."""
    figs = [c for c in df.columns if c not in text]
    df = df.assign(**{str(c): df[c].str.replace(" ", "\u00a0") for c in figs})
    # !important: Streamlit sets each cell's alignment inline
    return df.style.set_properties(subset=figs, **{"text-align": "right !important"})


def _phases(ctx: Context) -> None:
    """The answer first: prefill | decode | setup and outside | generate of each selected run
    (side by side for one run; a row per run and part for several). Of the whole generate()
    calls: the sidebar's filters do not apply."""
    # of the runs as loaded: kept across a change of the filters
    cells = {n: ctx.memo("phase_cells", lambda n=n: headline_cells(ctx.loaded[n].headline()), runs=(n,),
                         filtered=False) for n in ctx.selected}
    st.subheader("Prefill vs decode")
    if all(c.empty for c in cells.values()):
        st.info("No generate() call in the selected runs: nothing to split into prefill and decode.")
    elif len(cells) == 1:
        st.table(_right(next(iter(cells.values())).rename_axis(None)), **_kwargs(st.table, width="content"))
    else:
        st.table(_right(phases_long({md(n): c for n, c in cells.items()}), ("run", "part")),
                 **_kwargs(st.table, width="content", hide_index=True))
    notes = [TOKENS_NOTE[:1].upper() + TOKENS_NOTE[1:] + ".", "Shares are of the wall time of the generate() "
             "calls: the parts add up to 100%; setup and outside is generate()'s own time before the first "
             "forward and after the last step."]
    if any(not c.empty and "peak memory" not in c.index for c in cells.values()):
        notes.append("Peak memory is the CUDA allocator's: not measured on the CPU.")
    if any(v is not None for v in astuple(ctx.filters)):
        notes.append("The sidebar's filters do not apply to this table: it is the whole generate() calls.")
    st.caption(" ".join(notes))


def _generated(ctx: Context) -> None:
    """Each selected run's generated text (or token ids) and prompt, escaped and capped."""
    several = len(ctx.selected) > 1
    for name in ctx.selected:
        run = ctx.loaded[name]
        seqs, prompt = sequences(run.generated()), run_prompt(run.meta)
        if not seqs and prompt is None:
            continue
        box = st.expander(f"{md(name)}: generated text and prompt", expanded=False) if several else st.container()
        wrap = _kwargs(box.code, wrap_lines=True)
        if seqs:
            box.markdown("**Generated**" + ("" if any(t for _, _, t in seqs) else " (token ids: the run kept no text)"))
        for label, content, _ in seqs:
            if label:
                box.caption(md(label))
            box.code(cap(content, MAX_LONG_TEXT), language=None, **wrap)
        if prompt is not None:
            box.markdown(f"**Prompt**, {md(prompt[0])}")
            box.code(cap(prompt[1], MAX_LONG_TEXT), language=None, **wrap)


def overview(ctx: Context) -> None:
    """Prefill vs decode side by side, what was generated, then the headline numbers per
    generate call, prefill vs decode per block, and one step broken down.

    Runs merged from several ranks get a headline row per rank's generate call, bars per
    phase and rank, and a per-rank table of the blocks.
    """
    run = ctx.run
    _phases(ctx)
    _noise_notes(ctx)
    _generated(ctx)
    st.subheader("Per generate call")
    head = ctx.memo("headline", lambda: named_headline(run))
    rank_list = ctx.memo("ranks", lambda: figures.ranks(run))
    multi = len(rank_list) > 1
    for line in ctx.memo("models", lambda: model_lines(run.runs)):
        st.markdown(f"**Model** {md(line)}")
    several = len(ctx.selected) > 1
    # three cards a row: a card narrower than its number cuts it off ("1,418.60…")
    cols = st.columns(3)
    cols[0].metric("Runs", len(ctx.selected))
    # ranks record the same generate calls side by side: count them once
    n_calls = int(head.groupby("rank", observed=True).size().max()) if "rank" in head.columns and len(head) else len(head)
    cols[1].metric("Generate calls", n_calls, help="per rank" if multi else None)
    cols[2].metric("Steps", fmt.count(len(run.steps)))
    cols = st.columns(3)
    cols[0].metric("Call rows", fmt.count(len(run.calls)))
    if not several:
        ttft = fmt.ms(head["ttft_ms"].mean() if len(head) else None, unit=True) or "n/a"
        tpot = fmt.ms(head["tpot_ms_p50"].mean() if len(head) else None, unit=True) or "n/a"
        many = len(head) > 1
        cols[1].metric("TTFT (mean)" if many else "TTFT", ttft)
        cols[2].metric("TPOT p50 (mean)" if many else "TPOT p50", tpot)
    else:
        st.caption("Several runs: each is shown on its own (a row of the table, a bar of the charts), never added "
                   "together.")
    if multi:
        st.caption(f"These runs merge ranks {', '.join(map(str, rank_list))}: one headline row per rank's generate "
                   "call; the block bars are per phase and rank (the pattern tells ranks apart).")
    show_table(head, "overview_headline")
    by = st.radio("Time by", ["block", "role", "module"], horizontal=True, key="overview_by",
                  help="Self time: each instant of a forward counted once, so the bars of a phase add up to "
                       "100 % with the residue. A block's self time is its whole subtree.")
    if several:
        each = ctx.each()
        show_chart(ctx.memo("phase_blocks_runs", lambda: figures.phase_blocks_runs(
            {n: (r.calls, r.steps) for n, r in each.items()}, by=by), by), "overview_blocks")
        show_chart(ctx.memo("step_breakdown_runs", lambda: figures.step_breakdown_runs(
            {n: (r.calls, r.steps) for n, r in each.items()})), "overview_breakdown")
        _spread(ctx)
        return
    show_chart(ctx.memo("phase_blocks", lambda: figures.phase_blocks(run.calls, run.steps, by=by), by), "overview_blocks")
    if multi:
        st.caption(f"Prefill vs decode per block ({by}) and rank; share: of that rank's forward time")
        show_table(ctx.memo("rank_summary", lambda: per_rank_summary(run.calls, run.steps, by=by), by),
               "overview_ranks")
    show_chart(ctx.memo("step_breakdown", lambda: figures.step_breakdown(run.calls, run.steps, run.sampling)),
           "overview_breakdown")
    if len(run.sampling):
        show_chart(ctx.memo("sampling_stages", lambda: figures.sampling_stages(run.sampling, run.steps)),
               "overview_sampling_stages")
        st.caption("The sampling step per phase, the time outside the model stage by stage: generate's kwargs "
                   "update, each logits processor, the stopping checks, the next inputs, the probe's own "
                   "bookkeeping and the remainder (token choice, bookkeeping); ms per step, shares of the time "
                   "outside the model and of the whole step")
        show_table(ctx.memo("sampling_summary", run.sampling_summary), "overview_sampling")
    _spread(ctx)


def _noise_notes(ctx: Context) -> None:
    """The busy-machine warning of each selected run that was recorded on a busy machine."""
    quiet = []
    for name in ctx.selected:
        b = ctx.memo("noise", lambda name=name: ctx.loaded[name].noise(), runs=(name,), filtered=False)
        if b.busy:
            st.warning(f"Run **{md(name)}**: {b.message()}.", icon="⚠️")
        elif b.wait_pct == b.wait_pct:
            quiet.append(f"{md(name)} {b.wait_pct:.1f} %")
    if quiet:
        st.caption("Machine quiet while recording (share of step time waiting for a CPU; warning above "
                   f"10 %): {', '.join(quiet)}")


def _spread(ctx: Context) -> None:
    """Median and min-max over the generate calls, where there are several."""
    run = ctx.run
    head = ctx.memo("headline_spread", lambda: run.headline_spread())
    if head.empty or int(head["generates"].max()) < 2:
        return
    st.caption(f"Spread over the {int(head['generates'].max())} generate() calls: median and min - max "
               "(spread_pct = (max - min) / median)")
    show_table(head, "overview_spread_head")
    show_table(ctx.memo("block_spread", lambda: run.spread("block")), "overview_spread_blocks")
