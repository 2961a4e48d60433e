"""Figures of the call tree: an icicle of the module tree per phase and a layer x role heatmap.

Pure ``DataFrame -> Figure`` builders like :mod:`reports.figures` (which re-exports them), shared
by the HTML report and the dashboard. Both read self times from :mod:`probe.analysis.accounting`, so
what they draw adds up to the phase's forward time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probe.analysis import accounting
from probe.columns import ints
from probe.analysis.op_tree import DISPATCH_ROLE, OP_ROLE, op_tree, short_op
from probe.schema import ROLES, Phase

from .figure_base import HEIGHT, empty_figure, floats, panels, plot_text, themed

#: one colour per role family, so the same kind of work looks the same everywhere in the tree
ROLE_COLORS = {
    "embed": "#8c564b", "layer": "#c7c7c7", "norm": "#bcbd22", "head": "#9467bd", "model": "#e5e5e5",
    "rotary_emb": "#17becf", "attention": "#d62728", "q_proj": "#ff9896", "k_proj": "#ff9896", "v_proj": "#ff9896",
    "qkv_proj": "#ff9896", "o_proj": "#f7b6d2", "qk_norm": "#dbdb8d", "attention_fn": "#a50f15", "mlp": "#1f77b4",
    "router": "#aec7e8", "experts": "#6baed6", "shared_expert": "#6baed6", "gate_proj": "#9ecae1", "up_proj": "#9ecae1",
    "gate_up_proj": "#9ecae1", "down_proj": "#c6dbef", "act_fn": "#2ca02c", "layer_norm": "#dbdb8d",
    "dropout": "#f0f0f0", "linear": "#ffbb78", "other": "#f0f0f0", "residue": "#7f7f7f", "probe": "#393b79",
    "op": "#fdd0a2", "dispatch": "#bdbdbd",
}


def _short(module: str, parent_module: str | None) -> str:
    """``layers.3`` for ``model.layers.3`` under ``model``: the name relative to the parent."""
    if parent_module and module.startswith(parent_module + "."):
        return module[len(parent_module) + 1:]
    return module


def icicle(calls: pd.DataFrame, steps: pd.DataFrame, phase: Phase = "decode", max_depth: int | None = None,
           ops: pd.DataFrame | None = None) -> go.Figure:
    """The module tree of ``phase`` as an icicle: width = inclusive time, left to right.

    Each box is a module at its place in the call tree (the same module called from two
    places is two boxes), its length its inclusive host time summed over the phase's recorded
    steps; the root is the phase's forward time, whose residue (and the probe's own cost) are
    boxes of their own. Hover: total and self time, calls, mean per call and the self share.

    Args:
        calls, steps: the frames.
        phase: the phase to draw.
        max_depth: levels shown at once (click a box to zoom in); default all.
        ops: a deep run's ``ops`` frame: each module's self time is then opened down to its ops
            and its ``(dispatch and Python)`` (:func:`probe.analysis.op_tree.op_tree`); where the
            ops took longer than the timed self time, they are drawn at their own length.

    Returns:
        A plotly icicle, coloured by role.
    """
    title = f"Module tree, {phase}"
    t = accounting.tree_table(calls, steps)
    t = t[t["phase"] == phase]
    if t.empty:
        return empty_figure(title, f"no calls recorded in {phase}")
    opened = ops is not None and bool((ops["phase"] == phase).any())
    if opened:
        t = op_tree(t, ops)
        title += " down to its ops"
    n_steps = int(t.loc[t["node"] == accounting.RESIDUE, "calls"].sum()) or 1
    root = f"{phase} forward"
    node = t["node"].astype(str).tolist()
    parent = [root if pd.isna(p) else str(p) for p in t["parent_node"]]
    module_of = dict(zip(node, t["module"].astype(str)))
    labels = [short_op(m) if r == OP_ROLE else _short(m, module_of.get(p))
              for m, p, r in zip(t["module"].astype(str), parent, t["role"].astype(str))]
    self_ms = np.maximum(floats(t["self_ms"]), 0.0)  # GPU noise can make a self time a hair below 0
    if opened:  # a node's ops and dispatch row hold its self time: the node adds nothing of its own
        self_ms = np.where(t["node"].isin(set(t.loc[t["role"] == DISPATCH_ROLE, "parent_node"])), 0.0, self_ms)
    total = floats(t["total_ms"])
    total = np.where(np.isnan(total) | (total == 0), self_ms, total)
    is_op = t["role"].isin([OP_ROLE, DISPATCH_ROLE]).to_numpy()
    fwd = float(np.nansum(np.maximum(floats(t["self_ms"]), 0.0)[~is_op]))  # the forward, whatever the ops read
    sampled = ""
    if opened:
        n_sampled = len(ops.loc[ops["phase"] == phase, ["run_id", "step"]].drop_duplicates())
        sampled = (f"<br><sup>ops: mean over {n_sampled} sampled step{'s' if n_sampled != 1 else ''} (deep pass) "
                   "times the phase's steps; (dispatch and Python) = self time less ops</sup>")
    custom = np.column_stack([total, floats(t["self_ms"]), floats(t["calls"]), floats(t["mean_ms"]), floats(t["share"]) * 100])
    roles = t["role"].astype(str).tolist()
    fig = go.Figure(go.Icicle(
        ids=[plot_text(root), *[plot_text(v) for v in node]], parents=["", *[plot_text(v) for v in parent]],
        labels=[plot_text(f"{phase} forward {fwd:,.2f} ms"), *[plot_text(v) for v in labels]],
        values=np.r_[0.0, self_ms], branchvalues="remainder", sort=False,
        marker={"colors": ["#ffffff", *[ROLE_COLORS.get(r, "#f0f0f0") for r in roles]], "line": {"width": 0.5}},
        customdata=np.vstack([[fwd, 0.0, n_steps, fwd / n_steps, 0.0], custom]),
        text=["", *[plot_text(r) for r in roles]],
        texttemplate="%{label} %{percentRoot:.1%}", tiling={"orientation": "h"}, maxdepth=max_depth or -1,
        hovertemplate="<b>%{label}</b> (%{text})<br>total %{customdata[0]:.3f} ms, self %{customdata[1]:.3f} ms"
                      "<br>%{customdata[2]:.0f} calls, mean %{customdata[3]:.4f} ms"
                      "<br>self share %{customdata[4]:.2f}% of the phase's forward<extra></extra>",
    ))
    steps_text = f"{n_steps} step{'s' if n_steps != 1 else ''}"
    themed(fig).update_layout(title={"text": f"{title}<br><sup>length = inclusive host time over {steps_text} "
                             f"(click a box to zoom, hover for self time)</sup>{sampled}"},
                      height=max(HEIGHT, 720),
                      margin={"l": 10, "r": 10, "t": 100 if sampled else 80, "b": 10})
    return fig


def _layer_role_tables(ph: "accounting.Phases", phases) -> list[tuple[str, pd.DataFrame]]:
    """Per phase with decoder-layer calls, self ms per step of each (layer, role-level name):
    summed for every phase at once on integer keys (a call without a role or phase skipped, as
    a pivot table of the names skips it), without a string per call, a sort, or a copy of the
    calls."""
    c = ph.calls
    if c.empty:
        return []
    layer = ints(c["layer"], -1)
    n_layer = int(layer.max()) + 1
    if n_layer <= 0:
        return []
    pc, pu = ph.codes("phase")
    codes, uniq = accounting.label_codes(c, "role")
    names = np.asarray(uniq, dtype=object)
    width = max(len(names), 1)
    key = pc.astype(np.int64)  # (phase * layers + layer) * roles + role
    key *= n_layer
    key += layer
    key *= width
    key += codes
    size = len(pu) * n_layer * width
    key[(layer < 0) | (pc < 0) | (codes < 0)] = size  # calls outside every layer: a bin of their own
    vals = ph.floats("self_ms")
    if np.isnan(vals.sum()):
        vals = np.nan_to_num(vals)
    total = np.bincount(key, weights=vals, minlength=size + 1)[:size].reshape(len(pu), -1)
    seen = np.bincount(key, minlength=size + 1)[:size].reshape(len(pu), -1) > 0
    out = []
    for phase in phases:
        at = [i for i, p in enumerate(pu) if str(p) == phase]
        if not at or phase not in ph.n_steps.index or not seen[at[0]].any():
            continue
        keys = np.flatnonzero(seen[at[0]])  # the (layer, role) pairs met, in order
        table = pd.Series(total[at[0]][keys] / int(ph.n_steps[phase]), index=pd.MultiIndex.from_arrays(
            [pd.Index(keys // width, name="layer"), pd.Index(names[keys % width], name="role")])).unstack("role")
        out.append((phase, table[sorted(table.columns)]))
    return out


def layer_roles(calls: pd.DataFrame, steps: pd.DataFrame, phases: tuple[Phase, ...] = ("prefill", "decode")) -> go.Figure:
    """Layer x role heatmaps of self time per step, one panel per phase, side by side.

    Rows are the decoder layers, columns the roles inside a layer: ``layer (self)`` is the
    layer's own self time (residual adds, glue between its sublayers), ``attention (rest)`` the
    attention module's self time outside its projections and attention function, and so on. A cell is that role's self
    host ms per recorded step of the phase in that layer, so a row adds up to the layer's
    inclusive time per step. Hover adds the cell's share of the phase's forward time.

    Returns:
        One heatmap per phase that has decoder-layer calls, values written in the cells.
    """
    title = "Self time per layer and role"
    ph = accounting.phases(calls, steps)
    tables = _layer_role_tables(ph, phases)
    if not tables:
        return empty_figure(title, "no decoder-layer calls recorded")
    order = {r: i for i, r in enumerate(["layer", *[r for r in ROLES if r != "layer"]])}
    order[accounting.ATTENTION_REST] = order["attention"]
    fig, refs = panels([plot_text(f"{p}: ms per step ({int(ph.n_steps[p])} step"
                                  f"{'s' if int(ph.n_steps[p]) != 1 else ''})") for p, _ in tables], 0.04, shared_y=True)
    n_layers = 0
    for i, (phase, table) in enumerate(tables):
        cols = sorted(table.columns, key=lambda r: (order.get(r, len(order)), r))
        table = table[cols]
        n_layers = max(n_layers, len(table.index))
        total = float(ph.total[phase]) / int(ph.n_steps[phase])
        z = table.to_numpy(dtype="float64")
        share = z / total * 100 if total else np.full_like(z, np.nan)
        labels = [("layer (self)" if r == "layer" else r) for r in cols]
        fig.add_trace(go.Heatmap(
            z=z, x=[plot_text(v) for v in labels], y=table.index.to_numpy(), colorscale="Viridis",
            customdata=share, texttemplate="%{z:.3f}", textfont={"size": 9}, showscale=False,
            hovertemplate=plot_text(phase) + ", layer %{y}, %{x}<br>%{z:.4f} ms per step<br>"
                          "%{customdata:.2f}% of the forward<extra></extra>", **refs[i],
        ))
    only_layers = all(list(t.columns) == ["layer"] for _, t in tables)
    hint = "<br><sup>only whole layers were recorded: record with depth='sublayers' or 'all' to split them by " \
           "role</sup>" if only_layers else ""
    themed(fig).update_layout(title={"text": f"{title} (self host ms per step, written in the cells; a row adds up to "
                                     f"the layer's time){hint}"},
                      height=max(HEIGHT, 200 + 20 * n_layers),
                      margin={"l": 60, "r": 20, "t": 90, "b": 110})
    fig.update_xaxes(tickangle=-40)
    fig.layout.yaxis.update(autorange="reversed", dtick=1 if n_layers <= 40 else None, title_text="layer")  # the first panel's
    return fig
