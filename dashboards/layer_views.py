"""The dashboard's Layers and Tree pages: inside the model, layer by layer (layer x step and
layer x role heatmaps, each layer's mean time per phase) and as the module tree (an icicle and the
tree as a table, collapsed at a chosen level).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import probe
from probe.analysis.run import block_summary
from probe.reports import figures, tree_figures

from .context import Context, show_chart, show_table


def _per_layer(run: probe.Run) -> pd.DataFrame:
    """Mean host ms per call of each decoder layer, one column per phase."""
    summ = block_summary(run.calls, run.steps, by="module")
    per_layer = summ[summ["role"] == "layer"].rename(columns={"name": "module"})
    if per_layer.empty:
        return pd.DataFrame()
    table = layer_means(per_layer)
    phases = [p for p in probe.PHASES if p in table.columns]
    table = table[["layer", "module", *phases]]
    table.columns = ["layer", "module", *[f"{p} mean ms" for p in phases]]
    if {"prefill mean ms", "decode mean ms"} <= set(table.columns):
        table["prefill / decode"] = table["prefill mean ms"] / table["decode mean ms"]
    return table


def layer_means(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows.pivot_table(index=["layer", "module"], columns="phase", values="mean_ms",
    observed=True).reset_index()`` of summary rows (a row per module and phase), made directly
    where each (layer, module, phase) has one row with a value, as the summary's module level
    has: the mean of one value is that value, and pandas' pivot costs 5 ms a run (a Layers view
    of 20 runs pivots 20 times); pivoted by pandas otherwise."""
    key = rows[["layer", "module", "phase"]]
    layer, module, phase = (key[c].astype(object).to_numpy() for c in key.columns)
    mean = rows["mean_ms"].to_numpy(dtype="float64", na_value=np.nan)
    cells = {(lv, m, p): v for lv, m, p, v in zip(layer, module, phase, mean)}
    if (len(cells) < len(rows) or key.isna().to_numpy().any() or np.isnan(mean).any()
            or not all(isinstance(m, str) and isinstance(p, str) for m, p in zip(module, phase))):
        return rows.pivot_table(index=["layer", "module"], columns="phase", values="mean_ms",
                                observed=True).reset_index()
    pairs = sorted({(lv, m) for lv, m in zip(layer, module)})  # pandas sorts the groups so
    out = pd.DataFrame({"layer": pd.array([lv for lv, _ in pairs], dtype=rows["layer"].dtype),
                        "module": pd.array([m for _, m in pairs], dtype=rows["module"].dtype)})
    for p in sorted(set(phase)):
        out[p] = np.array([cells.get((lv, m, p), np.nan) for lv, m in pairs], dtype="float64")
    out.columns = pd.Index(list(out.columns), dtype=rows["phase"].dtype, name="phase")
    return out


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
    ops = not run.ops.empty and st.checkbox(
        "Open each module down to its ops (deep pass)", key="tree_ops",
        help="Each op's mean over the deep pass's sampled steps, scaled to the phase's timed steps, under the "
             "innermost recorded module that ran it; (dispatch and Python) = the module's self time less its ops")
    show_chart(ctx.memo("icicle", lambda: tree_figures.icicle(run.calls, run.steps, phase=phase,
                                                              ops=run.ops if ops else None), phase, ops, runs=runs),
               "tree_icicle")
    levels = ctx.memo("tree_depth", lambda: _tree_depth(run), runs=runs)
    depth = st.slider("Collapse the table at tree level", 1, max(levels, 2), min(3, levels), key="tree_depth",
                      disabled=levels < 2, help="1 = the top-level calls; deeper calls fold into their ancestor, "
                                                "whose self time becomes its inclusive time")
    level = "op" if ops else "module"
    table = ctx.memo("tree_table", lambda: run.tree(depth=depth, level=level), depth, level, runs=runs)
    table = table[table["phase"] == phase].drop(columns=["phase", "node", "parent_node"])
    indent = ["\u00a0\u00a0" * (int(d) - 1) + str(m) for d, m in zip(table["depth"], table["module"])]
    table = table.drop(columns="module")
    table.insert(0, "module", pd.Series(indent, index=table.index, dtype="string"))
    st.caption(f"The {phase} call tree down to level {depth}: self and inclusive host ms summed over the phase's "
               "steps; share = self time over the phase's forward time (the column adds up to 100 %"
               + (" over the modules; each module's ops and its (dispatch and Python) split its self time)." if ops
                  else ")."))
    show_table(table, "tree_table")
