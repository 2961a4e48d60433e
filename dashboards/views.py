"""The dashboard's views: one function per sidebar entry, each drawing a :class:`Context`.

Figures come from ``reports.figures`` (shared with the HTML report), which aggregate with
pandas and cap their points, so a view draws a million-call run as fast as a small one.
Tables are paged and downloads are built only when clicked.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import probe
from probe import fmt
from probe.analysis.headline import TOKENS_NOTE, headline_cells, sequences
from probe.analysis.run import block_summary
from probe.reports import figures, tree_figures
from probe.reports.tables import per_rank_summary
from probe.reports.text import MAX_LONG_TEXT, cap, run_prompt

from . import data

PLOTLY_CONFIG = {"displaylogo": False}


@dataclass
class Context:
    """What every view draws from.

    Attributes:
        runs_dir: the runs folder.
        selected: names of the runs picked in the sidebar.
        loaded: every readable run by name, unfiltered.
        filters: the sidebar filters.
        run: the selected runs' frames concatenated, with the filters applied.
        signatures: file signature of every loaded run (:func:`data.signature`), by name.
        sweeps: the sweeps found in the runs folder, by name (:attr:`data.Found.sweeps`).
        comparisons: the ``probe compare`` folders found there, by name (:attr:`data.Found.comparisons`).
    """

    runs_dir: Path
    selected: list[str]
    loaded: dict[str, probe.Run]
    filters: data.Filters
    run: probe.Run
    signatures: dict[str, tuple]
    sweeps: dict[str, Path] = field(default_factory=dict)
    comparisons: dict[str, Path] = field(default_factory=dict)

    def key(self, runs: list[str] | tuple[str, ...] | None = None) -> tuple:
        """Identifies the frames of ``runs`` (default: the selected ones) under the filters:
        the folder, each run's name and file signature, and the filters."""
        names = self.selected if runs is None else runs
        return str(self.runs_dir), tuple((n, self.signatures[n]) for n in names), astuple(self.filters)

    def memo(self, what: str, build: Callable[[], Any], *params: Hashable, runs: tuple[str, ...] | None = None):
        """``build()``, cached on :meth:`key`, ``what`` and ``params``.

        Reruns (a click, another view and back) then skip the aggregation over a large run.
        ``runs`` names the loaded runs ``build`` reads when they are not the selected ones.
        """
        return cached(self.key(runs), what, params, build)

    def each(self) -> dict[str, probe.Run]:
        """Each selected run on its own, with the filters applied (several runs are shown side
        by side, never added together)."""
        return {n: data.apply_filters(self.loaded[n], self.filters) for n in self.selected}

    def names(self) -> dict[str, str]:
        """Legend name of each run id: its run folder's name (``name · call 2`` for a folder's
        later generate calls)."""
        return self.memo("names", lambda: run_names(self.run.runs))


# Keyed on the run files' signatures, never on the frames: hashing a 1M-row frame for the
# key would cost as much as the aggregation it saves. The builder (leading underscore) is
# not hashed; results are small (figures, summary tables), so pickling them is cheap.
@st.cache_data(max_entries=256, show_spinner=False)
def cached(key: tuple, what: str, params: tuple, _build: Callable[[], Any]) -> Any:
    """``_build()``, kept per (key, what, params) across reruns (see :meth:`Context.memo`)."""
    return _build()


_MD_SPECIAL = re.compile(r"([\\*_\[\]<>#|~$])")


def md(text: object) -> str:
    """``text`` with Markdown's special characters escaped (backticks kept for code)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def show_chart(fig, key: str) -> None:
    """A plotly figure with the dashboard's chart settings."""
    st.plotly_chart(fig, key=key, theme=None, config=PLOTLY_CONFIG)


def show_table(df: pd.DataFrame, key: str, raw: bool = False) -> None:
    """A table; unless ``raw``, shown in the units of the terminal and the report
    (:func:`probe.fmt.cell`: ``1,418.6`` ms, ``416.0 KiB``, ``98.4%``) while the values stay
    numbers (a Styler: columns still sort by value)."""
    if raw or df.empty:
        st.dataframe(df, key=key, hide_index=True)
        return
    shown = df.reset_index(drop=True)
    # a column with no value at all (the allocator figures of a CPU run) would read "None" on
    # every row: it is left out, as in the report and Jupyter
    shown = shown[[c for c in shown.columns if shown[c].notna().any()]]
    styled = shown.style.format({c: (lambda v, c=str(c): fmt.cell(c, v)) for c in shown.columns}, na_rep="")
    st.dataframe(styled, key=key, hide_index=True)


def run_names(runs: pd.DataFrame) -> dict[str, str]:
    """Run id -> the name of the folder it was loaded from (``run`` column of the dashboard's
    runs frame), with `` · call N`` for a folder's later generate calls; the id itself otherwise."""
    if runs.empty or "run" not in runs.columns:
        return {}
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for rid, name in zip(runs["run_id"].astype(str), runs["run"].astype(str)):
        if rid in out:
            continue
        seen[name] = seen.get(name, 0) + 1
        out[rid] = name if seen[name] == 1 else f"{name} · call {seen[name]}"
    return out


def _headline(run: probe.Run) -> pd.DataFrame:
    """``figures.headline`` with the run folder's name first, to tell several runs apart."""
    head = figures.headline(run.runs, run.steps, meta=run.meta)
    if "run" in run.runs and len(head):
        names = run.runs.drop_duplicates("run_id").set_index("run_id")["run"]
        head.insert(0, "run", head["run_id"].map(names))
    return head


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
    cells = {n: ctx.memo("phases", lambda n=n: headline_cells(ctx.loaded[n].headline()), runs=(n,))
             for n in ctx.selected}
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


# --------------------------------------------------------------------------- views
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
    head = ctx.memo("headline", lambda: _headline(run))
    rank_list = ctx.memo("ranks", lambda: figures.ranks(run))
    multi = len(rank_list) > 1
    for line in ctx.memo("models", lambda: model_lines(run.runs)):
        st.markdown(f"**Model** {md(line)}")
    several = len(ctx.selected) > 1
    # three cards a row: a card narrower than its number cuts it off ("1,418.60…")
    cols = st.columns(3)
    cols[0].metric("Runs", len(ctx.selected))
    # ranks record the same generate calls side by side: count them once
    n_calls = int(head.groupby("rank").size().max()) if "rank" in head.columns and len(head) else len(head)
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
        b = ctx.memo("noise", lambda name=name: ctx.loaded[name].noise(), runs=(name,))
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


def _per_layer(run: probe.Run) -> pd.DataFrame:
    """Mean host ms per call of each decoder layer, one column per phase."""
    summ = block_summary(run.calls, run.steps, by="module")
    per_layer = summ[summ["role"] == "layer"].rename(columns={"name": "module"})
    if per_layer.empty:
        return pd.DataFrame()
    table = per_layer.pivot_table(index=["layer", "module"], columns="phase", values="mean_ms",
                                  observed=True).reset_index()
    phases = [p for p in probe.PHASES if p in table.columns]
    table = table[["layer", "module", *phases]]
    table.columns = ["layer", "module", *[f"{p} mean ms" for p in phases]]
    if {"prefill mean ms", "decode mean ms"} <= set(table.columns):
        table["prefill / decode"] = table["prefill mean ms"] / table["decode mean ms"]
    return table


def _inside_layers(run: probe.Run) -> bool:
    """Whether the run recorded modules inside the decoder layers (depth sublayers or all)."""
    c = run.calls
    return bool(len(c)) and bool((c["layer"].notna() & (c["role"] != "layer")).any())


def layers(ctx: Context) -> None:
    """Layer x step heatmap for a phase; layer x role heatmaps where the run recorded inside the
    layers (else each block's prefill vs decode time); each layer's mean time per phase."""
    run = ctx.run
    present = ctx.memo("phases", lambda: set(run.calls["phase"].dropna().unique()))
    phases = [p for p in probe.PHASES if p in present] or ["decode"]
    phase = st.radio("Phase", phases, index=phases.index("decode") if "decode" in phases else 0,
                     horizontal=True, key="layers_phase")
    if len(ctx.selected) > 1:  # one heatmap per run, and bars per run: never added together
        each = ctx.each()
        for i, (name, one) in enumerate(each.items()):
            fig = ctx.memo("heatmap", lambda one=one: figures.layer_heatmap(one.calls, phase=phase), phase,
                           runs=(name,))
            fig.update_layout(title={"text": f"{figures.plot_text(name)}: {fig.layout.title.text}"})
            show_chart(fig, f"layers_heatmap_{i}")
        if any(ctx.memo("inside_layers", lambda one=one: _inside_layers(one), runs=(name,)) for name, one in each.items()):
            for i, (name, one) in enumerate(each.items()):
                fig = go.Figure(ctx.memo("layer_roles", lambda one=one: tree_figures.layer_roles(one.calls, one.steps),
                                         runs=(name,)))
                fig.update_layout(title={"text": f"{figures.plot_text(name)}: {fig.layout.title.text}"})
                show_chart(fig, f"layers_roles_{i}")
        else:
            show_chart(ctx.memo("phase_blocks_runs", lambda: figures.phase_blocks_runs(
                {n: (r.calls, r.steps) for n, r in each.items()}, by="module"), "module"), "layers_blocks")
        table = ctx.memo("per_layer_runs", lambda: pd.concat(
            [_per_layer(r).assign(run=n) for n, r in each.items()], ignore_index=True))
        if len(table):
            table = table[["run", *[c for c in table.columns if c != "run"]]]
    else:
        show_chart(ctx.memo("heatmap", lambda: figures.layer_heatmap(run.calls, phase=phase), phase), "layers_heatmap")
        if ctx.memo("inside_layers", lambda: _inside_layers(run)):
            show_chart(ctx.memo("layer_roles", lambda: tree_figures.layer_roles(run.calls, run.steps)), "layers_roles")
        else:
            show_chart(ctx.memo("phase_blocks", lambda: figures.phase_blocks(run.calls, run.steps, by="module"),
                            "module"), "layers_blocks")
        table = ctx.memo("per_layer", lambda: _per_layer(run))
    if len(table):
        st.caption("Mean host ms per call of each decoder layer, by phase")
        show_table(table, "layers_table")


def _tree_depth(run: probe.Run) -> int:
    """Levels of the call tree in ``run`` (1 where only top-level calls were recorded)."""
    t = run.tree()
    return int(t["depth"].max()) if len(t) else 1


def tree_view(ctx: Context) -> None:
    """The module tree per phase: an icicle (length = inclusive time) and the tree as a table,
    collapsed at a chosen level. Of several selected runs, one at a time (trees are never added)."""
    run, runs = ctx.run, None
    if len(ctx.selected) > 1:
        pick = st.selectbox("Run", ctx.selected, key="tree_run")
        run, runs = ctx.each()[pick], (pick,)
    present = ctx.memo("step_phases", lambda: set(run.steps["phase"].dropna().unique()), runs=runs)
    phases = [p for p in probe.PHASES if p in present] or ["decode"]
    phase = st.radio("Phase", phases, index=phases.index("decode") if "decode" in phases else 0,
                     horizontal=True, key="tree_phase")
    show_chart(ctx.memo("icicle", lambda: tree_figures.icicle(run.calls, run.steps, phase=phase), phase, runs=runs),
           "tree_icicle")
    levels = ctx.memo("tree_depth", lambda: _tree_depth(run), runs=runs)
    depth = st.slider("Collapse the table at tree level", 1, max(levels, 2), min(3, levels), key="tree_depth",
                      disabled=levels < 2, help="1 = the top-level calls; deeper calls fold into their ancestor, "
                                                "whose self time becomes its inclusive time")
    table = ctx.memo("tree_table", lambda: run.tree(depth=depth), depth, runs=runs)
    table = table[table["phase"] == phase].drop(columns=["phase", "node", "parent_node"])
    indent = ["\u00a0\u00a0" * (int(d) - 1) + str(m) for d, m in zip(table["depth"], table["module"])]
    table = table.drop(columns="module")
    table.insert(0, "module", pd.Series(indent, index=table.index, dtype="string"))
    st.caption(f"The {phase} call tree down to level {depth}: self and inclusive host ms summed over the phase's "
               "steps; share = self time over the phase's forward time (the column adds up to 100 %).")
    show_table(table, "tree_table")


def timeline(ctx: Context) -> None:
    """Per-token latency over the steps, and latency against the KV length."""
    run = ctx.run
    names = ctx.names()
    show_chart(ctx.memo("token_latency", lambda: figures.token_latency(run.steps, run.runs, names)), "timeline_tokens")
    show_chart(ctx.memo("latency_vs_kv", lambda: figures.latency_vs_kv(run.steps, names)), "timeline_kv")


def _block_memory_figure(mem: pd.DataFrame):
    """Bars of per-block memory by phase: allocator growth on CUDA, output bytes on CPU."""
    import plotly.express as px  # only this view needs it; keeps the first page load lighter

    if mem.empty:
        return figures.empty_figure("Memory per block")
    on_cuda = mem["mean_alloc_delta_bytes"].notna().any()
    value = "mean_alloc_delta_bytes" if on_cuda else "mean_out_bytes"
    label = "mean allocator growth per call" if on_cuda else "mean output bytes per call"
    if "run" in mem.columns:  # several runs: a bar per run, one panel per phase
        return px.bar(mem, x="role", y=value, color="run", facet_col="phase", barmode="group",
                      template=figures.TEMPLATE, title="Memory per block: " + label + ", per run",
                      labels={value: "bytes", "role": "block"}, color_discrete_sequence=figures.RUN_COLORS,
                      height=figures.HEIGHT)
    return px.bar(mem, x="role", y=value, color="phase", barmode="group", template=figures.TEMPLATE,
                  title="Memory per block: " + label, labels={value: "bytes", "role": "block"},
                  color_discrete_map=figures.PHASE_COLORS, height=figures.HEIGHT)


def _kv_growth(steps: pd.DataFrame, names: dict[str, str] | None = None) -> pd.DataFrame:
    """Per generate call: KV-cache bytes after its last step and bytes per cached position."""
    steps = steps.dropna(subset=["kv_cache_bytes"])
    if steps.empty:
        return pd.DataFrame()
    last = steps.sort_values("step").groupby("run_id", sort=False).tail(1)
    positions = last["kv_len"] + last["q_len"]
    named = {"run": [names.get(str(r), str(r)) for r in last["run_id"]]} if names else {}
    return pd.DataFrame({
        **named, "run_id": last["run_id"].to_numpy(), "last step": last["step"].to_numpy(),
        "positions": positions.to_numpy(), "kv_cache_bytes": last["kv_cache_bytes"].to_numpy(),
        "bytes per position": (last["kv_cache_bytes"].astype("float64") / positions.where(positions > 0)).to_numpy(),
    })


def memory(ctx: Context) -> None:
    """Per-block memory (output bytes; allocator deltas on CUDA) and KV-cache growth."""
    run = ctx.run
    names = ctx.names()
    if len(ctx.selected) > 1:  # per run, never added together
        each = ctx.each()
        mem = ctx.memo("block_memory_runs", lambda: pd.concat(
            [data.block_memory(r.calls).assign(run=n) for n, r in each.items()], ignore_index=True))
        mem = mem[["run", *[c for c in mem.columns if c != "run"]]]
    else:
        mem = ctx.memo("block_memory", lambda: data.block_memory(run.calls))
    show_chart(ctx.memo("block_memory_fig", lambda: _block_memory_figure(mem)), "memory_blocks")
    if len(mem) and not mem["mean_alloc_delta_bytes"].notna().any():
        st.caption("On CPU the probe records each call's output tensor bytes; allocator figures need CUDA.")
    show_table(mem, "memory_table")
    show_chart(ctx.memo("memory_over_steps", lambda: figures.memory_over_steps(run.steps, run.calls, names)),
           "memory_steps")
    kv = ctx.memo("kv_growth", lambda: _kv_growth(run.steps, names if len(ctx.selected) > 1 else None))
    if len(kv):
        st.caption("KV cache after the last step shown, and its size per cached position")
        show_table(kv, "memory_kv")


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


def compare(ctx: Context) -> None:
    """Two runs side by side: headline, blocks, and the per-block difference."""
    from probe.analysis.stats import differences
    from probe.reports.diff import block_diff

    pool = list(ctx.loaded)  # any readable run; the sidebar's picks are the defaults
    if len(pool) < 2:
        st.info("Compare needs two readable runs in the runs folder; record another with "
                f"`probe run --out {ctx.runs_dir}/NAME`.")
        return
    picks = [n for n in ctx.selected if n in pool] + [n for n in pool if n not in ctx.selected]
    for key, default in (("compare_a", picks[0]), ("compare_b", picks[1])):
        if st.session_state.get(key) not in pool:  # first visit, or the run list changed
            st.session_state[key] = default
    c1, c2 = st.columns(2)
    a = c1.selectbox("Run A", pool, key="compare_a")
    b = c2.selectbox("Run B", pool, key="compare_b")
    if a == b:
        st.warning("Pick two different runs to compare.")
    summaries = {}
    for col, name, tag in ((c1, a, "a"), (c2, b, "b")):
        run = data.apply_filters(ctx.loaded[name], ctx.filters)
        with col:
            st.subheader(md(name))
            show_table(ctx.memo("headline", lambda: _headline(run), runs=(name,)),
                   f"compare_head_{tag}")
            show_chart(ctx.memo("phase_blocks", lambda: figures.phase_blocks(run.calls, run.steps, by="block"), "block",
                            runs=(name,)), f"compare_blocks_{tag}")
        summaries[tag] = ctx.memo("summary", lambda: block_summary(run.calls, run.steps), runs=(name,))
    for note in differences(ctx.loaded[a], ctx.loaded[b]):
        st.info(md(f"Not like for like: {note}."))
    level = st.radio("Compare by", ["block", "role", "module"], horizontal=True, key="compare_level")
    sa, sb = (summaries[t][summaries[t]["level"] == level] for t in ("a", "b"))
    show_chart(figures.compare_blocks(sa, sb, a, b), "compare_diff")
    st.caption(f"Per {level} and phase: B - A and B / A of the self host ms (the rows never overlap)")
    show_table(block_diff(sa, sb), "compare_table")
    if a != b:
        from probe.analysis.stats import significance
        from probe.reports.compare import significance_table

        ra = data.apply_filters(ctx.loaded[a], ctx.filters)
        rb = data.apply_filters(ctx.loaded[b], ctx.filters)
        sig = ctx.memo("significance", lambda: significance(ra, rb), a, b, runs=(a, b))
        st.subheader("Is the difference larger than the noise?")
        for tag, name in (("A", a), ("B", b)):
            nb = ctx.memo("noise", lambda name=name: ctx.loaded[name].noise(), runs=(name,))
            if nb.busy:
                st.warning(f"{tag} ({md(name)}): {nb.message()}.", icon="⚠️")
        st.caption("B slower by: B's mean over A's minus one (tok/s: A's over B's; positive is worse), with a 95% "
                   "bootstrap interval; significant when the interval excludes 0 and a Mann-Whitney U test gives "
                   "p < 0.05. `probe compare A B --fail-above PCT` turns this into a CI gate.")
        show_table(significance_table(sig), "compare_significance")


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


VIEWS: dict[str, Callable[[Context], None]] = {
    "Overview": overview,
    "Layers": layers,
    "Tree": tree_view,
    "Timeline": timeline,
    "Memory": memory,
    "Shapes": shapes,
    "Compare": compare,
    "Data": data_view,
}
