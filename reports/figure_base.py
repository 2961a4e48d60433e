"""What every figure builder shares: the look (template, height, phase and run colours), text
that plotly shows literally, the "no data" figure, and the binning that caps a trace's points.

The builders themselves live by subject (:mod:`reports.block_figures`,
:mod:`reports.breakdown_figures`, :mod:`reports.timeline_figures`, :mod:`reports.tree_figures`,
:mod:`reports.serve_figures`) and are gathered in :mod:`reports.figures`.
"""

from __future__ import annotations

import functools
import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probe.schema import PHASES

#: most points per line/scatter trace; longer series are averaged in consecutive bins
MAX_POINTS = 2000

HEIGHT = 420
TEMPLATE = "plotly_white"
PHASE_COLORS = {"prefill": "#1f77b4", "decode": "#ff7f0e", "extend": "#2ca02c", "recompute": "#9467bd",
                "forward": "#7f7f7f", "mixed": "#d62728"}
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf", "#393b79", "#637939",
              # the light tones of the first ten, and two more dark ones: 20 runs side by side (the
              # dashboard's case) each get a colour of their own
              "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
              "#dbdb8d", "#9edae5", "#8c6d31", "#843c39"]


def plot_text(value: object) -> str:
    """``value`` as text that plotly shows literally (its pseudo-HTML is escaped)."""
    return html.escape(str(value), quote=False)


@functools.lru_cache(maxsize=1)
def _template() -> "go.layout.Template":
    import plotly.io as pio

    return pio.templates[TEMPLATE]


def themed(fig: go.Figure) -> go.Figure:
    """``fig`` in the reports' template (:data:`TEMPLATE`). The template is validated once, not
    again for each figure (which cost 10 ms a figure, a tenth of a small report), as plotly
    itself sets its default template: the figure gets a copy, the same as by name."""
    layout = fig.layout
    if not hasattr(layout, "_validate"):  # a plotly without the switch: set by name
        layout.template = TEMPLATE
        return fig
    before = layout._validate
    layout._validate = False
    try:
        layout.template = _template()
    finally:
        layout._validate = before
    return fig


def base_figure(title: str, xtitle: str = "", ytitle: str = "") -> go.Figure:
    """An empty figure in the reports' template, size, margins and legend place."""
    # given to the constructor: the same layout as update_layout makes, at a quarter of its cost
    return themed(go.Figure(layout={"title": {"text": title}, "height": HEIGHT, "xaxis": {"title": {"text": xtitle}},
                                    "yaxis": {"title": {"text": ytitle}}, "margin": {"l": 60, "r": 30, "t": 60, "b": 60},
                                    "legend": {"orientation": "h", "y": -0.2}}))


def empty_figure(title: str, message: str = "no data recorded") -> go.Figure:
    """A figure with ``title`` and a centred ``message`` instead of data."""
    fig = base_figure(title)
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False})
    fig.add_annotation(text=plot_text(message), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 16})
    return fig


def phases_in(frame: pd.DataFrame) -> list[str]:
    """The phases present in ``frame``, the known ones in their order, then any others sorted."""
    present = set(frame["phase"].dropna().unique())
    return [p for p in PHASES if p in present] + sorted(present - set(PHASES))


def bin_index(n: int, max_points: int) -> np.ndarray:
    """Bin index of each of ``n`` consecutive points so at most ``max_points`` bins remain."""
    width = max(1, -(-n // max_points))
    return np.arange(n) // width


def binned(df: pd.DataFrame, x: str, ys: list[str], max_points: int = MAX_POINTS) -> pd.DataFrame:
    """``df`` (sorted by ``x``) with consecutive rows averaged down to ``max_points`` rows."""
    if len(df) <= max_points:
        return df[[x, *ys]].reset_index(drop=True)
    b = bin_index(len(df), max_points)
    g = df[[x, *ys]].groupby(b, sort=True)
    return g.mean().reset_index(drop=True)


def unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` of integers; small non-negative ones (layers,
    steps) by a table of the values present instead of a sort of every row."""
    if len(values) and values.dtype.kind in "iu" and values.min() >= 0 and values.max() <= 4 * len(values):
        present = np.zeros(int(values.max()) + 1, bool)
        present[values] = True
        rank = np.cumsum(present) - 1
        return np.flatnonzero(present).astype(values.dtype), rank[values]
    return np.unique(values, return_inverse=True)


def floats(values: pd.Series) -> np.ndarray:
    """A float64 numpy array (nullable columns' NA -> NaN), which plotly stores compactly."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def distinct_text(values: pd.Series) -> list[str]:
    """The distinct values of a text column as text, in order of first appearance, nulls left
    out (found on the column's codes: no Python string per row)."""
    return [str(v) for v in pd.unique(values.dropna())]


def per_step_sum(calls: pd.DataFrame, col: str, roles) -> dict[str, pd.Series]:
    """Per run id, the sum of ``col`` over the calls with a role in ``roles``, per step (a Series
    indexed by step; steps with no such call are absent), worked out on integer codes."""
    from probe.analysis.grouping import codes_in_order
    from probe.analysis.labels import factorized
    from probe.columns import ints

    if calls.empty:
        return {}
    rc, ru = factorized(calls, "role")
    ic, iu = factorized(calls, "run_id")
    step = ints(calls["step"], -1)
    keep = np.append(np.isin(np.asarray(ru, dtype=object), list(roles)), False)[rc]  # a null role: not wanted
    keep &= ic >= 0
    keep &= step >= 0
    if not keep.any():
        return {}
    span = int(step.max()) + 1
    n = len(iu) * span
    key = ic.astype(np.int64) * span
    key += step
    vals = calls[col].to_numpy(dtype="float64", na_value=np.nan)
    if np.isnan(vals.sum()):
        vals = np.nan_to_num(vals)  # a call without the value adds nothing, as a pandas sum skips it
    if n > 4 * len(calls) + (1 << 20):  # sparse (run, step) pairs: summed on the pairs met, not a table of all
        codes, pairs = codes_in_order(key[keep], n)
        total = np.bincount(codes, weights=vals[keep], minlength=len(pairs))
        run, at = np.divmod(np.asarray(pairs, np.int64), span)
        return {str(r): pd.Series(total[run == i], index=at[run == i]).sort_index()
                for i, r in enumerate(iu) if (run == i).any()}
    key[~keep] = n  # the calls not summed, in a bin of their own
    total = np.bincount(key, weights=vals, minlength=n + 1)[:n].reshape(len(iu), span)
    seen = np.bincount(key, minlength=n + 1)[:n].reshape(len(iu), span) > 0
    return {str(r): pd.Series(total[i][seen[i]], index=np.flatnonzero(seen[i])) for i, r in enumerate(iu) if seen[i].any()}


@functools.lru_cache(maxsize=16)
def _panels_layout(n: int, spacing: float, shared_y: bool) -> str:
    import json

    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=n, shared_yaxes=shared_y, horizontal_spacing=spacing,
                        subplot_titles=[f"\x00{i}" for i in range(n)])
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)
    return json.dumps(layout)


def panels(titles: list[str], spacing: float = 0.04, shared_y: bool = False) -> tuple[go.Figure, list[dict]]:
    """Side-by-side panels as ``make_subplots(rows=1, cols=len(titles))`` lays them out, in the
    reports' template, from a layout worked out once per panel count (``make_subplots`` costs
    ~15 ms a figure). Returns the figure and, per panel, the ``xaxis``/``yaxis`` a trace of
    that panel takes."""
    import json

    layout = json.loads(_panels_layout(len(titles), spacing, shared_y))
    for note, title in zip(layout.get("annotations", []), titles):
        note["text"] = title
    refs = [{"xaxis": f"x{i + 1 if i else ''}", "yaxis": f"y{i + 1 if i else ''}"} for i in range(len(titles))]
    return themed(go.Figure(layout=layout)), refs
